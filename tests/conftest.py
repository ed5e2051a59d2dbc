"""Shared test helpers: where the mmpretrain fixtures live, markers."""
import os
from pathlib import Path

import pytest
import torch

# timm and transformers read only local folders in the tests: a Hub lookup must fail, not download
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the repo; MFF_DS_FIXTURES points elsewhere (e.g. a copy carried to a GPU machine)
FIXTURES = Path(os.environ.get("MFF_DS_FIXTURES", REPO.parent / "shared" / "fixtures" / "mmpretrain"))

torch.set_num_threads(min(2, torch.get_num_threads()))
# the fused kernels run their first autotune config (as in the interpreter): on a GPU, autotuning would compile
# every config for each of the tests' many widths; tests/test_kernels.py compiles them all for sm_90 instead
os.environ.setdefault("MFF_DS_AUTOTUNE", "0")


def fixture_names():
    """Every mmpretrain fixture in ../shared (NAME_ckpt.pth + NAME_io.pth), so new ones are picked up."""
    if not FIXTURES.is_dir():
        return []
    return sorted(p.name[: -len("_ckpt.pth")] for p in FIXTURES.glob("*_ckpt.pth")
                  if (FIXTURES / p.name.replace("_ckpt.pth", "_io.pth")).exists())


def require_fixtures():
    if not fixture_names():
        pytest.skip(f"mmpretrain fixtures not found at {FIXTURES} (the ../shared folder beside the repo)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over a minute on 2 CPU cores")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped on CPU)")
    config.addinivalue_line("markers", "system: launches real multi-process / multi-node systems")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (run benchmarks/run_gpu_suite.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _isolate_distributed_env():
    """In-process training exports RANK/MASTER_PORT/... (and keeps its process group and port); a child process
    started by a later test must not inherit them, or it would try to listen on the same port."""
    saved = {k: os.environ.get(k) for k in _DIST_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
