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
