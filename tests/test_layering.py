"""The layering holds (import-linter contracts in pyproject.toml) and would be caught if broken; the signal handlers
can be installed before anything heavy is imported."""
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_signals_import_nothing_heavy():
    code = ("import sys; import mff_ds.engine.signals as s; s.catch(); "
            "print(sorted(m for m in ('torch', 'yaml', 'deepspeed', 'mff_ds.engine.recipe') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
