"""A NaN loss stops the run with a clear message and no checkpoint after it, or rolls back when configured."""
import json
import os
import sys
from pathlib import Path

import forkserver
from conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
# one process: 8 micro-batches per epoch, 2 per step -> 4 steps/epoch, 12 steps
TINY = tiny_recipe(schedule={"epochs": 3}, checkpoint={"every_steps": 4, "keep_last": 3})


# Feeds NaN images in micro-batch POISON (0-based; 10 = step 6) through the task's `forward` hook.
SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from mff_ds.pretrain.recipe import load_recipe
from mff_ds.engine.trainer import NonFiniteLossError, fit
from mff_ds.pretrain import PretrainTask
recipe = load_recipe({cfg!r}, sys.argv[2:], world_size=1)
class Poisoned(PretrainTask):
    calls = 0
    def forward(self, engine, images, labels):
        self.calls += 1
        x = self.inputs(images)
        return engine(x * float("nan") if self.calls == {poison} + 1 else x)
try:
    s = fit(Poisoned(recipe), sys.argv[1])
    print("SUMMARY", s["step"], s["rollbacks"], s["last_loss"])
except NonFiniteLossError as e:
    print("STOPPED", e)
"""


def run(tmp: Path, *sets):
    (tmp / "tiny.yaml").write_text(TINY)
    (tmp / "run.py").write_text(SCRIPT.format(repo=str(REPO), cfg=str(tmp / "tiny.yaml"), poison=10))
    p = forkserver.run([sys.executable, str(tmp / "run.py"), str(tmp / "out"), *sets], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_nan_stops_without_corrupt_checkpoint(tmp_path):
    out = run(tmp_path)
    assert "STOPPED loss became NaN/Inf at optimizer step 6" in out, out
    assert "global_step4" in out  # names the last good checkpoint
    ckpts = tmp_path / "out" / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step4"
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step4"]
    steps = [json.loads(l)["step"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # nothing logged from the poisoned interval


def test_nan_rolls_back_and_finishes(tmp_path):
    out = run(tmp_path, "on_nonfinite=rollback")
    line = next(l for l in out.splitlines() if l.startswith("SUMMARY"))
    step, rollbacks, last = line.split()[1:]
    assert (int(step), int(rollbacks)) == (12, 1) and float(last) == float(last)
    meta = json.loads((tmp_path / "out" / "checkpoints" / "global_step12" / "mff_complete.json").read_text())
    # rolled back to step 4 but the data stream went on past the poisoned batches: it ends 2 steps further on
    # (epoch 3, batch 4) than an undisturbed run (epoch 2, batch 8)
    assert (meta["epoch"], meta["batch"]) == (3, 4)
