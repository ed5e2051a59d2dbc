"""Shared test helpers: where the mmpretrain fixtures live, the tiny recipe, markers."""
import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

# timm and transformers read only local folders in the tests: a Hub lookup must fail, not download
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
# The mmpretrain fixtures: the tiny ones (tiny64, mae_tiny64) ship in tests/fixtures/mmpretrain, so a fresh clone
# runs the equivalence tests; the larger `small` comes from ../shared beside the repo when it is there, or from
# MFF_DS_FIXTURES (e.g. a copy carried to a GPU machine). The first folder holding a file wins.
FIXTURE_DIRS = [Path(d) for d in (os.environ.get("MFF_DS_FIXTURES"),) if d] + [
    REPO / "tests" / "fixtures" / "mmpretrain", REPO.parent / "shared" / "fixtures" / "mmpretrain"]

torch.set_num_threads(min(2, torch.get_num_threads()))
# the fused kernels run their first autotune config (as in the interpreter): on a GPU, autotuning would compile
# every config for each of the tests' many widths; tests/test_kernels.py compiles them all for sm_90 instead
os.environ.setdefault("MFF_DS_AUTOTUNE", "0")


def fixture(filename: str) -> Path:
    """The path of an mmpretrain fixture file, from the first of FIXTURE_DIRS that holds it."""
    found = [d / filename for d in FIXTURE_DIRS if (d / filename).is_file()]
    return found[0] if found else FIXTURE_DIRS[-1] / filename


def fixture_names():
    """Every mmpretrain fixture found (NAME_ckpt.pth + NAME_io.pth), so new ones are picked up."""
    names = {p.name[: -len("_ckpt.pth")] for d in FIXTURE_DIRS if d.is_dir() for p in d.glob("*_ckpt.pth")}
    return sorted(n for n in names if fixture(f"{n}_io.pth").is_file())


OPTIONAL_FIXTURES = ("small",)  # too large for the repo: ../shared beside it, or MFF_DS_FIXTURES


def require_fixtures(*names):
    """Skip unless the optional `small` fixture is found; every other fixture ships in tests/fixtures, so a missing
    one fails the test instead of skipping it."""
    missing = [n for n in names if n not in fixture_names()]
    where = [str(d) for d in FIXTURE_DIRS]
    if [n for n in missing if n not in OPTIONAL_FIXTURES]:
        pytest.fail(f"mmpretrain fixture(s) {missing} not found in {where}; they ship in tests/fixtures/mmpretrain")
    if missing:
        pytest.skip(f"mmpretrain fixture(s) {missing} not found in {where} (`small` lives in the ../shared folder "
                    f"beside the repo)")


# The tiny pretraining recipe the engine tests share: a 2-block ViT on 32 px synthetic images, seconds per step on
# a CPU. One process: 8 micro-batches of 8 per epoch, 2 per optimizer step -> 4 steps per epoch.
TINY_RECIPE = {
    "name": "tiny",
    "model": {"arch": "mff_vit_tiny_patch16", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
              "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
              "out_indices": [0, 1], "kernels": "torch"},
    "data": {"source": "synthetic", "num_samples": 64, "num_workers": 0},
    "batch": {"global_batch": 16, "micro_batch": 8},
    "schedule": {"epochs": 1, "warmup_epochs": 1},
    "logging": {"every_steps": 2, "image_every_steps": 0, "progress_bar": False, "tensorboard": False},
}


def tiny_recipe(**sections) -> str:
    """TINY_RECIPE as YAML; a dict keyword updates the keys of its section (model={"depth": 4}), any other value
    sets a top-level key (seed=3)."""
    tree = copy.deepcopy(TINY_RECIPE)
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return yaml.safe_dump(tree, sort_keys=False)


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
