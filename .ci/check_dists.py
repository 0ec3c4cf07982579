"""Check what the built sdist and wheel hold, beyond what `twine check` looks at.

Usage: python .ci/check_dists.py DIST_DIR (run from the checkout root). The wheel must hold
exactly the package's files, `py.typed` among them, and the licence with its PEP 639 metadata;
the sdist must hold the licence and the tests with what they import.
"""

import re
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import gradual_sd


def package_files(root: Path) -> set[str]:
    return {
        path.relative_to(root).as_posix()
        for path in (root / "gradual_sd").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def check_wheel(wheel: Path, root: Path) -> None:
    dist_info = f"gradual_sd-{gradual_sd.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = HeaderParser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        shipped_license = archive.read(f"{dist_info}/licenses/LICENSE")
    package = {name for name in names if name.startswith("gradual_sd/")}
    expected = package_files(root)
    if package != expected:
        sys.exit(
            f"the wheel's package files differ from the source's: "
            f"extra {sorted(package - expected)}, missing {sorted(expected - package)}"
        )
    if "gradual_sd/py.typed" not in package:
        sys.exit("wheel has no gradual_sd/py.typed")
    strays = {name for name in names - package if not name.startswith(f"{dist_info}/")}
    if strays:
        sys.exit(f"wheel holds files outside the package: {sorted(strays)}")
    if shipped_license != (root / "LICENSE").read_bytes():
        sys.exit("the wheel's LICENSE differs from the checkout's")
    expected_fields = {
        "Name": "gradual-sd",
        "Version": gradual_sd.__version__,
        "License-Expression": "Apache-2.0",
    }
    for field, value in expected_fields.items():
        if metadata[field] != value:
            sys.exit(f"wheel metadata {field} is {metadata[field]!r}, expected {value!r}")
    if metadata.get_all("License-File") != ["LICENSE"]:
        sys.exit(f"wheel metadata License-File is {metadata.get_all('License-File')}, expected ['LICENSE']")
    requires = {re.split(r"[ ;<>=!~\[]", req)[0] for req in metadata.get_all("Requires-Dist") or []}
    if not {"torch", "timm", "einops"} <= requires:
        sys.exit(f"wheel metadata lacks core requirements: Requires-Dist names {sorted(requires)}")


def check_sdist(sdist: Path) -> None:
    prefix = f"gradual_sd-{gradual_sd.__version__}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(prefix) for name in archive.getnames()}
    needed = {
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "docs/index.md",
        "tests/conftest.py",
        "examples/train_gsdnet.py",
    }
    if not needed <= names:
        sys.exit(f"sdist lacks {sorted(needed - names)}")
    caches = sorted(name for name in names if "__pycache__" in name or name.endswith(".pyc"))
    if caches:
        sys.exit(f"sdist holds caches: {caches}")


def main() -> None:
    dist = Path(sys.argv[1])
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        sys.exit(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
    check_wheel(wheels[0], Path.cwd())
    check_sdist(sdists[0])
    print(f"checked {wheels[0].name} and {sdists[0].name}")


if __name__ == "__main__":
    main()
