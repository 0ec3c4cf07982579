import pytest
import torch


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
