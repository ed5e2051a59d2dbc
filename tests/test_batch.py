"""Batch arithmetic for any world size (engine.batch, the recipes' batch section): every shipped recipe on 1 to 64
ranks either trains with exactly its global batch, or is refused in one line naming the nearest feasible global
batches and their lr, or (global_batch_policy: nearest) trains with the batch and lr it announces."""
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

import forkserver
from mff_ds.engine import batch
from mff_ds.engine.recipe import RecipeError
from mff_ds.eval.recipe import load_eval_recipe
from mff_ds.pretrain import load_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
EVAL_PATHS = ["data.train_path=/x/train", "data.val_path=/x/val"]


def load(name, *sets, world):
    if name.startswith(("finetune", "linprobe")):
        return load_eval_recipe(f"configs/{name}.yaml", EVAL_PATHS + list(sets), world_size=world)
    return load_recipe(f"configs/{name}.yaml", list(sets) + (["data.path=/x"] if "digits" in name else []),
                       world_size=world)


def test_split_takes_the_largest_micro_batch_and_nearest_efficient_neighbours():
    assert batch.split(4096, 512, 8) == batch.BatchPlan(4096, 512, 1, 8)
    assert batch.split(4096, 512, 32) == batch.BatchPlan(4096, 128, 1, 32)  # the largest micro up to 512
    assert batch.split(4096, 512, 1) == batch.BatchPlan(4096, 512, 8, 1)
    assert batch.split(4096, 512, 6) is None and batch.split(4098, 512, 6).micro == 1  # 683 is prime
    assert not batch.efficient(batch.split(4098, 512, 6), 512)
    assert [p.global_batch for p in batch.nearest(4096, 512, 6)] == [4092, 4104]  # 341 x 2, 342 x 2 per rank
    assert [(p.micro, p.accum) for p in batch.nearest(4096, 512, 3)] == [(455, 3), (456, 3)]
    assert [p.micro for p in batch.nearest(1024, 128, 6, multiple=2)] == [84, 86]  # Mixup's pairs: even


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_on_1_to_64_ranks_trains_exactly_or_names_the_nearest(name):
    base = load(name, world=None)
    for world in range(1, 65):
        try:
            r = load(name, world=world)
        except RecipeError as e:
            (problem,) = e.problems  # one line
            m = re.match(r"batch\.global_batch: (\d+) images cannot be split exactly over (\d+) rank\(s\) .*; nearest: "
                         r"(.*); expected one of those, or batch\.global_batch_policy: nearest", problem)
            assert m and int(m.group(1)) == base.batch.global_batch and int(m.group(2)) == world, problem
            named = re.findall(r"(\d+) \(micro (\d+) x (\d+) accumulation, lr ([\d.e-]+)\)", m.group(3))
            assert named, problem
            for g, micro, accum, lr in named:  # each alternative splits as it says, with the lr it says
                assert int(g) == world * int(micro) * int(accum) and int(micro) <= base.batch.micro_batch
                assert float(lr) == pytest.approx(base.optim.base_lr * int(g) / 256, rel=1e-3)
            near = load(name, "batch.global_batch_policy=nearest", world=world)
            closest = min((int(g) for g, *_ in named), key=lambda g: (abs(g - base.batch.global_batch), g))
            assert near.batch.global_batch == closest and "training with" in near.batch_note()
            assert near.lr() == pytest.approx(base.optim.base_lr * closest / 256)
            continue
        b = r.batch
        assert b.global_batch == base.batch.global_batch and b.micro_batch <= base.batch.micro_batch
        assert r.plan.world == world and (r.plan.global_batch, r.plan.micro) == (b.global_batch, b.micro_batch)
        assert world * r.plan.micro * r.plan.accum == b.global_batch


def test_the_plan_the_check_makes_is_the_one_that_runs():
    """A recipe validated without a world size and checked for 16 ranks: the DeepSpeed config, the schedule and
    the lr read the plan that check made (it used to train with 0 accumulation steps and die dividing by it)."""
    import torch

    from mff_ds.engine.optim import build_ds_config, schedule_steps
    from mff_ds.engine.recipe import check
    from mff_ds.pretrain.recipe import from_dict
    r = from_dict(yaml.safe_load((REPO / "configs" / "mff_vit-b_300e.yaml").read_text()), world_size=None)
    with pytest.raises(RuntimeError, match="not checked for a world size"):
        r.plan
    assert check(r, 16) == [] and (r.plan.world, r.plan.micro, r.plan.accum) == (16, 256, 1)
    cfg = build_ds_config(r, 16, torch.device("cpu"))
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (4096, 256, 1)
    schedule, stop = schedule_steps(r, 313, None)
    assert schedule.steps_per_epoch == 313 and stop == 300 * 313 and schedule.peak == r.plan.lr == 2.4e-3
    # the recipe resolved for 16 ranks plans 32 from its batch section as written, not from the 16-rank micro batch
    assert check(r, 32) == [] and (r.plan.micro, r.plan.accum) == (128, 1)
    assert check(r, None) == [] and r.plan.world == 32 and r.batch.micro_batch == 128  # no world: the split stays
    assert check(r, 3)[0].startswith("batch.global_batch: 4096 images cannot be split exactly over 3 rank(s)")


def test_a_demo_on_three_ranks_trains_with_the_batch_and_lr_it_announces(tmp_path):
    """The demo's 32 images do not split over 3 ranks: refused naming 30 and 33; with the nearest policy it trains
    with 33 (3 x 11) and lr base_lr x 33 / 256, and recipe.yaml and the checkpoint marker record that."""
    with pytest.raises(RecipeError, match=r"nearest: 30 \(micro 10 x 1 accumulation, lr 0.001406\) or 33 \(micro 11"):
        load_recipe("demo", world_size=3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           str(REPO / "launch" / "pretrain.py"), "--output-dir", str(out), "--max-steps", "2",
           "--set", "batch.global_batch_policy=nearest", "--set", "logging.every_steps=1",
           "--set", "data.num_workers=0", "--set", "logging.image_every_steps=0", "--set", "checkpoint.export=false",
           "--set", "logging.tensorboard=false"]
    p = forkserver.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "training with 33 images per step = 3 rank(s) x micro batch 11 x 1 accumulation step(s), lr 0.001547" \
        in p.stderr
    ds = json.loads((out / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (33, 11, 1)
    rec = yaml.safe_load((out / "recipe.yaml").read_text())["batch"]
    assert rec == {"global_batch": 33, "micro_batch": 11, "global_batch_policy": "nearest"}
    marker = json.loads((out / "checkpoints" / "global_step2" / "mff_complete.json").read_text())
    assert marker["batch_plan"]["global_batch"] == 33 and marker["batch_plan"]["world_size"] == 3
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = 1.2e-2 * 33 / 256  # the demo's base_lr; warmup from x1e-4 over 2 epochs
    assert lrs[0] == pytest.approx(peak * 1e-4)
