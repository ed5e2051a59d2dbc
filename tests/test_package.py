"""The installable package: `pip install .` (not editable) gives a package that runs from any directory, with the
DeepSpeed configs and recipes as package data."""
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mff_ds").rglob("__init__.py")}
    assert found <= listed, f"pyproject.toml [tool.setuptools] packages misses {sorted(found - listed)}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable install of this checkout into a fresh folder (no dependencies: those come from this venv).
    It builds from a copy of what the package needs, so the build's build/ and egg-info stay out of the checkout."""
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("mff_ds", "configs", "ds_configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return target


def run_outside(installed: Path, cwd: Path, *args, timeout=300):
    """python ARGS in `cwd`, importing mff_ds from the install only (not from the checkout)."""
    env = dict(os.environ, PYTHONPATH=str(installed), OMP_NUM_THREADS="1", MFF_DS_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_installed_package_ships_configs_and_recipes(installed, tmp_path):
    assert (installed / "mff_ds" / "ds_configs" / "zero2.json").is_file()
    assert (installed / "mff_ds" / "ds_configs" / "zero1.json").is_file()
    p = run_outside(installed, tmp_path, "-m", "mff_ds.pretrain", "--help")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mff_vit-b_300e" in p.stdout  # the shipped recipes are listed by name
    code = ("import mff_ds, torch\n"
            "from mff_ds.pretrain.recipe import load_recipe\n"
            "from mff_ds.engine.optim import build_ds_config\n"
            "r = load_recipe('mff_vit-b_300e', world_size=8)\n"
            "print(mff_ds.__file__, build_ds_config(r, 8, torch.device('cpu'))['zero_optimization']['stage'])")
    p = run_outside(installed, tmp_path, "-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    where, stage = p.stdout.split()
    assert where.startswith(str(installed)) and stage == "1"  # ds_configs/zero1.json, from the install
    p = run_outside(installed, tmp_path, "-m", "mff_ds.pretrain", "--config", "no_such_recipe")
    assert p.returncode == 2 and "mff_vit-b_300e" in p.stderr and "Traceback" not in p.stderr


def test_installed_package_runs_the_demo_from_any_directory(installed, tmp_path):
    p = run_outside(installed, tmp_path, "-m", "mff_ds.pretrain", "--max-steps", "2",
                    "--set", "logging.progress_bar=false", "--set", "data.num_workers=0", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "done: step 2/" in p.stdout
    assert (tmp_path / "runs" / "demo" / "metrics.jsonl").is_file()


def test_every_command_runs_from_the_installed_console_script(installed, tmp_path):
    """`mff-ds COMMAND --help` (the console script pip installs) and `python -m mff_ds COMMAND --help`, outside the
    checkout, for every command the README shows."""
    script = installed / "bin" / "mff-ds"
    assert script.is_file()
    env = dict(os.environ, PYTHONPATH=str(installed), OMP_NUM_THREADS="1")
    for command in ("pretrain", "finetune", "linprobe", "evaluate", "convert", "zoo"):
        for argv in ([str(script), command, "--help"], [sys.executable, "-m", "mff_ds", command, "--help"]):
            p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0 and "usage:" in p.stdout, (argv, p.stderr[-2000:])
    p = subprocess.run([str(script), "pretrian"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "expected a command, one of pretrain" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "" and "mff-ds: expected a command, one of pretrain" in p.stderr


def test_the_installed_console_script_runs_a_real_command(installed, tmp_path):
    """Not only --help: `mff-ds zoo list` from the install, outside the checkout, reads the zoo table shipped in the
    package and the (empty) cache; so does `python -m mff_ds --local_rank=0 zoo list`, as `deepspeed --module
    mff_ds` runs it."""
    script = installed / "bin" / "mff-ds"
    env = dict(os.environ, PYTHONPATH=str(installed), OMP_NUM_THREADS="1", MFF_DS_CACHE=str(tmp_path / "cache"))
    for argv in ([str(script), "zoo", "list"], [sys.executable, "-u", "-m", "mff_ds", "--local_rank=0", "zoo", "list"]):
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (argv, p.stderr[-3000:])
        header, *rows = p.stdout.splitlines()
        assert header.split() == ["name", "kind", "params", "result", "file", "sha256", "cached"]
        names = {r.split()[0]: r for r in rows}
        assert {"mff_vit-b_300e", "mff_vit-b_800e", "mff_vit-b_300e_ft"} <= set(names)
        assert names["mff_vit-b_300e"].rstrip().endswith(" no")  # nothing cached in the fresh cache
