"""What `pip install .` (not editable) puts in the wheel: pyproject.toml lists packages and data
files by hand, so a new subpackage or data folder must be added there; these checks say which."""
import glob
import os

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setuptools() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _source_dir(package: str, package_dir: dict) -> str:
    return os.path.join(ROOT, package_dir.get(package, package.replace(".", os.sep)))


def test_every_subpackage_is_listed():
    config = _setuptools()
    listed = set(config["packages"])
    roots = {p: _source_dir(p, config.get("package-dir", {})) for p in listed if "." not in p}
    found = set()
    for package, folder in roots.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                relative = os.path.relpath(dirpath, folder)
                found.add(package if relative == "." else ".".join([package, *relative.split(os.sep)]))
    # seme.kernels is the top-level kernels/ folder, mapped by package-dir
    found |= {p for p in listed if p in config.get("package-dir", {})}
    assert found == listed, f"pyproject.toml's packages miss {sorted(found - listed)} or list {sorted(listed - found)}"


def test_every_data_file_is_packaged():
    config = _setuptools()
    package_dir, globs = config.get("package-dir", {}), config.get("package-data", {})
    unpackaged = []
    for package in config["packages"]:
        folder = _source_dir(package, package_dir)
        packaged = {os.path.realpath(f) for g in globs.get(package, []) for f in glob.glob(os.path.join(folder, g))}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not os.path.isfile(os.path.join(dirpath, d, "__init__.py"))]
            for name in filenames:
                if name.endswith((".py", ".pyc", ".so")):
                    continue
                path = os.path.join(dirpath, name)
                if os.path.realpath(path) not in packaged:
                    unpackaged.append(f"{package}: {os.path.relpath(path, folder)}")
    assert not unpackaged, f"files that a wheel would leave out (pyproject.toml's package-data): {unpackaged}"
