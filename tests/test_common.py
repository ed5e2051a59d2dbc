"""mff_ds.common (atomic writes, seeding) and the model-config problems returned as a list."""
import os
import random

import pytest
import torch

from mff_ds.common import atomic_write, seed_everything, write_json, write_text
from mff_ds.models.archs import config_problems


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"x": 1})
    assert path.read_text() == '{\n  "x": 1\n}'

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == '{\n  "x": 1\n}'  # the old file, untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temporary file left behind
    write_text(path, "new", fsync=True)
    assert path.read_text() == "new"


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    write_text(tmp_path / "a", "x")
    with open(tmp_path / "b", "w") as f:
        f.write("x")
    assert os.stat(tmp_path / "a").st_mode == os.stat(tmp_path / "b").st_mode


def test_seed_everything_repeats_every_generator():
    def draw():
        seed_everything(7)
        return random.random(), torch.rand(3).tolist()
    assert draw() == draw()


def test_config_problems_are_a_list_naming_each_key():
    cfg, problems = config_problems({"arch": "mff_vit_tiny_patch16", "img_size": 30, "embed_dim": 190})
    assert cfg is None
    assert problems[0] == "model.img_size: expected a multiple of patch_size 16, got 30"
    assert problems[1] == "model.embed_dim: expected a multiple of num_heads 3, got 190"
    cfg, problems = config_problems({"arch": "mff_vit_tiny_patch16", "depth": 0, "kernels": "cuda"})
    assert problems == ["model.depth: expected > 0, got 0",
                        "model.kernels: expected one of 'auto', 'triton' or 'torch', got 'cuda'"]
    cfg, problems = config_problems("mae_vit_nano_patch16")
    assert cfg is None and problems[0].startswith("model.arch: unknown architecture 'mae_vit_nano_patch16'")
    cfg, problems = config_problems("mae_vit_tiny_patch16", img_size=32)
    assert problems == [] and cfg.embed_dim == 192 and cfg.out_indices == [11]


def test_lazy_exports_import_on_first_use_and_name_what_is_missing():
    import sys

    from mff_ds.common import lazy_exports
    get = lazy_exports("mff_ds.eval", {"EvalRecipe": "recipe", "nothing": "recipe"})
    assert get("EvalRecipe").__name__ == "EvalRecipe" and "mff_ds.eval.recipe" in sys.modules
    for name in ("nothing", "absent", "__path__"):
        with pytest.raises(AttributeError, match=f"module 'mff_ds.eval' has no attribute '{name}'"):
            get(name)
    assert lazy_exports("mff_ds.convert", "formats")("load_any").__module__ == "mff_ds.convert.formats"
