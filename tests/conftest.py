import os

import pytest
import torch

# How the tests go over pytest-xdist's workers (``-n 2``): a module's tests stay together on one
# worker, so its module-scoped fixtures are built once, except in the sweeps below, whose tests
# share nothing and go one at a time to whichever worker is free; and the example modules that
# read the session's shared runs (``rafdb_run``) share one worker, so that each run trains once.
SPREAD = {"test_zoo", "test_hf_zoo"}
SHARED_RUNS = {"test_examples_training", "test_examples_protocol"}


def work_unit(nodeid: str) -> str:
    """The unit of tests that one worker runs together, for a test's node id."""
    module = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
    if module in SPREAD:
        return nodeid
    return "shared_runs" if module in SHARED_RUNS else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with :func:`work_unit` as the scope. (Its ``loadgroup`` mode
    would do this from marks, but it renames node ids in a way pytest 9.2 no longer sees, and
    then spreads a module's tests over both workers.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # a worker: its share of the cores, not all of them for each worker
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's seconds as a property of the test, in ``--junitxml``'s file, where
    ``.ci/check_durations.py`` tells a test's own time from its fixtures'."""
    item.user_properties.append((f"{call.when}_seconds", f"{call.duration:.3f}"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the example tests' models are tiny, and more
    threads only oversubscribe a shared CPU. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rafdb_run(tmp_path_factory):
    """One epoch of the training example's default method (gsd-acam) on the 16-image RAF-DB
    fixture with its default outputs (model_final.pt, model_best.pt, the exit model and its ONNX
    export), trained once per session for the tests that read a finished run
    (``example_runs.ExampleRun``; copy it before changing it)."""
    from example_runs import train
    from test_examples_training import TINY, rafdb_basic

    root = tmp_path_factory.mktemp("rafdb-run")
    return train([*rafdb_basic(root / "data"), *TINY, "--epochs", "1"], root / "run")
