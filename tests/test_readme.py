"""The README's quickstart runs and shows it worked, the package-index page is safe to publish,
the API reference lists the public API, and CI runs the README's two test commands with what
they need installed."""

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import torch

import gradual_sd

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PACKAGE_PAGE = ROOT / "docs" / "index.md"
PUBLIC_SUBPACKAGES = {"early_exit", "runtime"}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_quickstart_runs_and_prints_the_loss_terms_and_exported_class(capsys):
    blocks = python_blocks(README)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out, plain = namespace["out"], namespace["plain"]
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    printed = capsys.readouterr().out
    assert f"loss {out.loss.item():.3f}" in printed
    for name in out.losses:
        assert repr(name) in printed, f"the quickstart does not print loss term {name!r}"
    assert f"exported: {type(plain).__name__}" in printed


def test_package_page_quickstart_is_the_readme_quickstart():
    assert python_blocks(PACKAGE_PAGE.read_text())[:1] == python_blocks(README)[:1]


def test_package_page_is_the_long_description_and_has_only_absolute_links():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^readme = "docs/index.md"', pyproject, flags=re.M)
    page = PACKAGE_PAGE.read_text()
    targets = re.findall(r"\]\(([^)\s]+)", page)  # [text](target) and ![alt](target)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", page, flags=re.M)  # [label]: target
    targets += re.findall(r"<([^<>\s]+)>", page)  # <autolink>
    targets += re.findall(r"(?:href|src)=[\"']([^\"']+)", page)
    relative = [t for t in targets if not re.match(r"(https?://|mailto:)", t)]
    assert not relative, f"relative links break on the package index: {relative}"
    assert "source repository" in page
    for folder in ("docs/", "examples/", "benchmarks/"):
        assert f"`{folder}`" in page, f"the package page does not say where {folder} is"


def test_ci_runs_both_readme_test_commands_with_their_slowest_tests_and_the_budget():
    bash = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert len(bash) >= 3, "README needs its set-up command and the two test commands"
    quick = bash[1].strip().split("&&")[-1].strip()
    full = bash[2].strip()
    assert quick == "python -m pytest -n 2", "the quick tier is pytest's default selection, on two cores"
    assert full == 'python -m pytest -n 2 -v -m "slow or not slow"'
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    runs = [c for c in commands if c.startswith("python -m pytest")]
    assert len(runs) == 2, runs
    # CI adds what it reports (the ten slowest tests, the quick tier's durations for the budget)
    # to the README's commands, and selects nothing else.
    assert runs[0].startswith(quick + " ") and runs[1].startswith(full + " "), runs
    assert all("--durations=10" in run for run in runs)
    junit = re.search(r'--junitxml="?(\S+?)"?(\s|$)', runs[0])
    assert junit, "the quick tier must write the durations the budget reads"
    check = next((c for c in commands if c.startswith("python .ci/check_durations.py")), None)
    assert check is not None and junit.group(1) in check, "CI must hold the quick tier to its budget"
    assert commands.index(check) < commands.index(runs[1]), "the budget is checked before the full suite"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"""^addopts = ".*-m 'not slow'""", pyproject, flags=re.M), "the default skips slow"
    assert re.search(r'^    "slow: ', pyproject, flags=re.M), "the slow marker must be registered"


def pip_extras(command: str) -> set[str]:
    """The extras of the editable install in a shell command (``pip install -e ".[a,b]"``)."""
    match = re.search(r"""pip install[^\n]*-e ["']?\.\[([^\]]*)\]""", command)
    assert match, f"no editable install with extras in {command!r}"
    return {extra.strip() for extra in match.group(1).split(",")}


def test_the_quick_tier_command_installs_what_the_tests_skip_without_and_ci_installs_it():
    bash = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    readme_extras = pip_extras(bash[1])
    assert "test" in readme_extras, "the test extra brings pytest-xdist, which -n 2 needs"
    tests = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    skipped_without = set(re.findall(r"importorskip\([^)]*reason=\"the (\w+) extra", tests))
    assert skipped_without, "no test module names the extra it skips without"
    missing = skipped_without - readme_extras
    assert not missing, f"the README's test command skips the tests that need {sorted(missing)}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_extras <= pip_extras(ci), ".ci/run must install what the README's command installs"


def test_api_reference_lists_every_public_name():
    reference = (ROOT / "docs" / "reference.md").read_text()
    documented = re.findall(r"^::: gradual_sd\.(\w+)$", reference, flags=re.M)
    assert len(documented) == len(set(documented)), "a name is listed twice"
    assert set(documented) == set(gradual_sd.__all__) - {"__version__"} | PUBLIC_SUBPACKAGES


def test_only_the_public_api_is_unprefixed():
    """Every module but the public subpackages is internal (a leading underscore, as timm's are),
    so each public name has one import path: ``gradual_sd`` or a public subpackage."""
    found = {info.name for info in pkgutil.iter_modules(gradual_sd.__path__)}
    assert {name for name in found if not name.startswith("_")} == PUBLIC_SUBPACKAGES
    for name in PUBLIC_SUBPACKAGES:
        package = importlib.import_module(f"gradual_sd.{name}")
        inner = {info.name for info in pkgutil.iter_modules(package.__path__)}
        assert all(module.startswith("_") for module in inner), f"gradual_sd.{name}: {inner}"
        assert set(package.__all__).isdisjoint(gradual_sd.__all__)


def test_importing_the_package_loads_nothing_until_a_name_is_used():
    code = "import sys, gradual_sd; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_library_names_no_private_timm_module_and_no_torchvision_in_its_imports():
    """The squeeze-excite classes of torchvision and timm's private blocks are looked up when
    replace_squeeze_excite runs (``squeeze_excite_kinds``), not imported with the library."""
    for path in (ROOT / "gradual_sd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert not module.startswith("torchvision"), (path.name, module)
                assert not (module.startswith("timm") and "._" in module), (path.name, module)


DURATION = re.compile(r"\b\d+ min(?: \d+ s)?\b")  # a measured time; budgets are in seconds


def test_times_are_stated_in_one_place():
    """docs/benchmarks.md (section 6) is where the project's commands' times are measured and
    stated; the README repeats some of them, and each one it states is stated there, the same.
    The other pages cite the section instead of stating times that drift apart from it."""
    parts = (ROOT / "docs" / "benchmarks.md").read_text().split("## 6. How long the project's commands take")
    assert len(parts) == 2, "docs/benchmarks.md has no section 6 on how long the commands take"
    measured = set(DURATION.findall(parts[1]))
    assert measured, "section 6 states no time"
    differing = set(DURATION.findall(README)) - measured
    assert not differing, f"README states {sorted(differing)}, which docs/benchmarks.md section 6 does not"
    for page in (ROOT / "docs" / "reproducing.md", ROOT / "docs" / "index.md"):
        stated = DURATION.findall(page.read_text())
        assert not stated, f"{page.name} states {stated}: give them in docs/benchmarks.md, section 6"
