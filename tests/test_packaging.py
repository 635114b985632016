"""The packaging: one version, metadata in pyproject.toml, a build that says what to do without torch."""

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sparsemom_ext as sm

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def run_setup_py(*extra_path, setup_code="sys.modules['torch'] = None"):
    """Run setup.py as pip would, by default in a Python that cannot import torch."""
    code = (
        f"import sys; {setup_code}; sys.path.extend(sys.argv[1:]); "
        "sys.argv = ['setup.py', 'egg_info']; "
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})"
    )
    return subprocess.run([sys.executable, "-c", code, *extra_path], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_setup_py_without_torch_says_what_to_do_in_one_line():
    result = run_setup_py()
    assert result.returncode == 1
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("sparsemom_ext: building needs torch")
    assert "install torch first" in message and "pip install --no-build-isolation -e ." in message
    assert sys.executable in message  # which Python lacks torch


def test_setup_py_in_an_isolated_build_names_build_isolation():
    result = run_setup_py("/tmp/pip-build-env-test/overlay/lib/site-packages")
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.startswith("sparsemom_ext: pip is building in an isolated environment, which cannot see your "
                              "torch: install torch first, then build without build isolation: ")
    assert "\n" not in message and "pip install --no-build-isolation -e ." in message


def test_setup_py_with_an_old_setuptools_says_which_is_needed():
    result = run_setup_py(setup_code="import setuptools; setuptools.__version__ = '65.5.0'")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"sparsemom_ext: building needs setuptools >= 77, and {sys.executable} has "
                                     "65.5.0: pip install 'setuptools>=77', then build again")


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pyproject_holds_the_metadata_and_the_version_is_the_package_s():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    meta = project["project"]
    assert meta["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sparsemom_ext._version.__version__"}
    assert not re.search(r"\bversion\s*=", (ROOT / "setup.py").read_text(encoding="utf-8"))
    assert meta["requires-python"] == ">=3.10"
    # torch is a dependency but not a build requirement: an isolated build would compile
    # against a second torch.
    assert any(dep.startswith("torch") for dep in meta["dependencies"])
    assert not any(req.startswith("torch") for req in project["build-system"]["requires"])
    assert {"train", "test"} <= set(meta["optional-dependencies"])
    module, _, function = meta["scripts"]["sparsemom-train"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_installed_version_is_the_package_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("sparsemom_ext")
    except PackageNotFoundError:
        pytest.skip("sparsemom_ext is imported from a build tree, not installed")
    assert installed == sm.__version__ == sm.build_info()["version"]


def test_the_repository_cites_no_file_outside_it():
    """Code and documents point into the repository (docs/...), never at a team's files beside it."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    needles = ["ALGORITHMS" + ".md", "ARCHITECTURE" + ".md", "PERFORMANCE" + ".md", "../" + "shared/"]
    citing = []
    for name in filter(None, files.stdout.split("\0")):
        path = ROOT / name
        if not path.is_file() or path.suffix in {".gz", ".png", ".whl"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        citing += [f"{name}: {needle}" for needle in needles if needle in text]
    assert not citing, "files cite documents outside the repository: " + "; ".join(citing)
