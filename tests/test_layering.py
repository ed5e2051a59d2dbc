"""The layering holds (import-linter contracts in pyproject.toml) and would be caught if broken; no two mff_ds modules
import each other; the signal handlers can be installed before anything heavy is imported."""
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
from conftest import REPO

LINT = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_the_import_contracts_hold():
    p = lint(REPO)
    assert p.returncode == 0 and "5 kept, 0 broken" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


def test_an_engine_import_of_the_models_breaks_a_contract(tmp_path):
    shutil.copytree(REPO / "mff_ds", tmp_path / "mff_ds", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "mff_ds" / "engine" / "optim.py", "a") as f:
        f.write("\n\ndef _peek():\n    from mff_ds.models import build_model  # a lazy import counts too\n    return build_model\n")
    p = lint(tmp_path)
    assert p.returncode == 1, p.stdout[-3000:]
    assert "engine imports only common, schema and itself of mff_ds BROKEN" in p.stdout
    assert "mff_ds.engine.optim -> mff_ds.models" in p.stdout


def import_cycles(package: str = "mff_ds") -> list:
    """Every import cycle among the package's modules (imports inside functions count), each once, as its chain."""
    graph = grimp.build_graph(package, cache_dir=None)
    cycles = {}
    for a in sorted(graph.modules):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            back = graph.find_shortest_chain(importer=b, imported=a)
            if back:
                cycles.setdefault(frozenset(back), " -> ".join((a, *back)))
    return sorted(cycles.values())


def test_no_module_imports_itself_back():
    cycles = import_cycles()
    assert not cycles, "import cycles (no two modules may import each other, lazily or not):\n  " + "\n  ".join(cycles)


def test_a_lazy_import_back_is_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclic_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import B\n")
    (pkg / "b.py").write_text("B = 1\n\n\ndef f():\n    from .a import B  # inside a function: counts\n    return B\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclic_pkg") == ["cyclic_pkg.a -> cyclic_pkg.b -> cyclic_pkg.a"]


def test_signals_import_nothing_heavy():
    code = ("import sys; import mff_ds.engine.signals as s; s.catch(); "
            "print(sorted(m for m in ('torch', 'yaml', 'deepspeed', 'mff_ds.engine.recipe') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
