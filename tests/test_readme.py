"""The README's quickstart runs, and CI runs the README's test command."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["out"].loss.ndim == 0 and torch.isfinite(namespace["out"].loss)
    assert not any(m._forward_hooks for m in namespace["plain"].modules())


def test_ci_runs_the_readme_test_command():
    bash = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert len(bash) >= 2, "README needs its two set-up commands"
    test_command = bash[1].strip().split("&&")[-1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
