"""The package's import graph has no circle (scripts/check_imports.py), and the check can fail."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import check_imports  # noqa: E402


def test_the_package_imports_in_no_circle():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no import cycle" in proc.stdout


def test_the_check_finds_a_circle_and_a_lazy_one(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from .a import other  # lazy, still a dependency\n")
    names = {check_imports.module_name(p, tmp_path): p for p in package.rglob("*.py")}
    graph = {n: check_imports.imports_of(p, n, set(names)) for n, p in names.items()}
    assert check_imports.find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    (package / "b.py").write_text("def thing():\n    pass\n")
    graph = {n: check_imports.imports_of(p, n, set(names)) for n, p in names.items()}
    assert check_imports.find_cycle(graph) is None
