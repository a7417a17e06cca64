"""What a wheel (`pip install .`, not editable) and a source distribution carry: pyproject.toml lists
packages and data files by hand, and MANIFEST.in what an sdist adds (the extensions' headers among
it), so a new subpackage, data folder or source file must be named there; these checks say which."""
import glob
import os
import subprocess

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


def test_source_distribution_carries_what_builds_and_tests():
    """Every tracked file the extensions build from or the tests, benchmarks and docs use is in the
    sdist's list, as setuptools computes it from MANIFEST.in (csrc/cpu/openmp.h was missing: an
    sdist did not build)."""
    filelist = pytest.importorskip("setuptools._distutils.filelist")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = filelist.FileList()
    files.set_allfiles(tracked.stdout.split())
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                files.process_template_line(line)
    wanted = [f for f in tracked.stdout.split()
              if f.split("/")[0] in ("csrc", "tests", "bench", "docs") or f in ("LICENSE", "README.md", "constraints.txt")]
    missing = sorted(set(wanted) - set(files.files))
    assert not missing, f"MANIFEST.in leaves these out of a source distribution: {missing}"
