"""Exact resume, kill -9 mid-run and mid-save, refusal of incompatible checkpoints (2 CPU ranks over gloo)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forkserver
from conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
# 2 ranks: 8 micro-batches of 4 per rank and epoch, 2 accumulation steps -> 4 steps/epoch, 12 in all
TINY = tiny_recipe(seed=3, model={"depth": 4, "out_indices": [0, 2, 3]}, batch={"micro_batch": 4},
                   optim={"base_lr": 1.0e-2, "grad_clip": 0.05}, schedule={"epochs": 3},
                   checkpoint={"every_steps": 4, "keep_last": 2})


# Entry point that can SIGKILL itself: CRASH=save:K:R (rank R, while writing checkpoint K) or step:N:R
# (rank R, right after optimizer step N).
WRAPPER = """
import os, signal, sys, runpy
sys.path.insert(0, {repo!r})
kind, n, r = (os.environ.get("CRASH") or "none:0:0").split(":")
n, r = int(n), int(r)
if kind != "none" and int(os.environ.get("RANK", 0)) == r:
    if kind == "save":
        import torch
        _save = torch.save
        def save(obj, f, *a, **k):
            if f"global_step{{n}}" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)
            return _save(obj, f, *a, **k)
        torch.save = save
    else:
        from deepspeed.runtime.engine import DeepSpeedEngine
        _step = DeepSpeedEngine.step
        def step(self, *a, **k):
            out = _step(self, *a, **k)
            if self.global_steps >= n:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        DeepSpeedEngine.step = step
if os.environ.get("DUMP") and int(os.environ.get("RANK", 0)) == 0:  # the module's weights at the first forward
    from deepspeed.runtime.engine import DeepSpeedEngine
    _forward = DeepSpeedEngine.forward
    def forward(self, *a, **k):
        if not os.path.exists(os.environ["DUMP"]):
            import torch
            torch.save({{n: v.detach().float().clone() for n, v in self.module.state_dict().items()}}, os.environ["DUMP"])
        return _forward(self, *a, **k)
    DeepSpeedEngine.forward = forward
sys.argv = ["pretrain.py"] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def launch(tmp: Path, out: Path, *args, nproc=2, crash=None, timeout=120, dump=None):
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY)
    wrapper = tmp / "run.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO), script=str(REPO / "launch" / "pretrain.py")))
    env = dict(os.environ, OMP_NUM_THREADS="1", CRASH=crash or "", PYTHONPATH=str(REPO), DUMP=str(dump or ""))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(wrapper), "--config", str(cfg), "--output-dir", str(out), *args]
    return forkserver.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out: Path) -> dict:
    return {d["step"]: d["loss"] for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def weights(out: Path) -> dict:
    return load_file(str(out / "model_fp32.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 12-step run."""
    tmp = tmp_path_factory.mktemp("straight")
    ok(launch(tmp, tmp / "out"))
    return tmp / "out"


def test_resume_is_bitwise_exact(straight, tmp_path):
    out = tmp_path / "out"
    ok(launch(tmp_path, out, "--max-steps", "6"))  # stops mid-epoch 1 (batch 4 of 8)
    meta = json.loads((out / "checkpoints" / "global_step6" / "mff_complete.json").read_text())
    assert (meta["step"], meta["epoch"], meta["batch"], meta["world_size"]) == (6, 1, 4, 2)
    p = ok(launch(tmp_path, out))  # --resume auto is the default
    assert "at step 6 (epoch 1, batch 4)" in p.stdout + p.stderr
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed run differs from the uninterrupted one by {diff}"
    la, lb = losses(straight), losses(out)
    assert [la[s] for s in (8, 10, 12)] == [lb[s] for s in (8, 10, 12)]
    # the exports: our model file (config inside) and a timm encoder with the same weights
    from mff_ds.convert import load_model, read_file, to_timm
    model = load_model(out / "model_fp32.safetensors")
    assert all(torch.equal(v, b[k]) for k, v in model.state_dict().items())
    enc, meta = read_file(out / "encoder_timm.safetensors")
    assert meta["model_config"] == model.cfg.to_dict()
    assert enc.keys() == to_timm(model).keys() and all(torch.equal(v, enc[k]) for k, v in to_timm(model).items())


def test_resume_is_exact_with_data_workers(tmp_path):
    """Worker processes must not shift the restored RNG streams (the first iter() of a DataLoader with workers
    draws its base seed from a generator)."""
    w = ("--set", "data.num_workers=2")
    ok(launch(tmp_path, tmp_path / "straight", *w, nproc=1))  # 1 rank: 4 accumulation steps, 4 steps / epoch
    out = tmp_path / "out"
    ok(launch(tmp_path, out, *w, "--max-steps", "6", nproc=1))  # mid-epoch 1
    p = ok(launch(tmp_path, out, *w, nproc=1))
    assert "at step 6 (epoch 1, batch 8)" in p.stdout + p.stderr
    a, b = weights(tmp_path / "straight"), weights(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert losses(tmp_path / "straight")[12] == losses(out)[12]


def test_kill_mid_run_and_mid_save_then_resume_auto(straight, tmp_path):
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    p = launch(tmp_path, out, crash="step:6:1")  # kill -9 rank 1 after step 6
    assert p.returncode != 0
    assert (ckpts / "latest").read_text() == "global_step4"
    p = launch(tmp_path, out, crash="save:8:1")  # resumes from 4, then rank 1 dies writing its ZeRO shard of 8
    assert p.returncode != 0
    assert "at step 4" in p.stdout + p.stderr
    assert (ckpts / "global_step8").is_dir() and not (ckpts / "global_step8" / "mff_complete.json").exists()
    assert (ckpts / "latest").read_text() == "global_step4"  # the half-written save never became latest
    p = ok(launch(tmp_path, out))
    assert "at step 4" in p.stdout + p.stderr
    assert f"checkpoint {ckpts / 'global_step8'} is incomplete (no mff_complete.json" in p.stderr  # named
    assert (ckpts / "latest").read_text() == "global_step12"
    assert not (ckpts / "global_step4").exists()  # keep_last: 2
    assert sorted(os.listdir(ckpts / "global_step8")) == sorted(os.listdir(ckpts / "global_step12"))
    a, b = weights(straight), weights(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    # the steps the failed attempts logged after the checkpoint they resumed from were redone: each step once
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [2, 4, 6, 8, 10, 12] and losses(out) == losses(straight)
    # goodput over the three attempts: the second logged steps 6 and 8 before its kill, which the third redid from
    # step 4 (the first was killed before it logged step 6: that step is in the time from its last line on)
    from mff_ds.engine.goodput import breakdown
    good = breakdown(json.loads((out / "goodput.json").read_text())["attempts"])
    assert 0 < lines[-1]["goodput"] < 1 and good["attempts"] == 3 and good["redone_steps"] == 4 and good["failure_s"] > 0
    assert abs(sum(good[k] for k in ("steps_s", "startup_s", "checkpoint_s", "failure_s", "stop_gap_s", "other_s"))
               - good["wall_s"]) < 1e-6 * good["wall_s"] + 1e-6
    assert "goodput " in p.stderr + p.stdout and "4 redone step(s)" in p.stderr + p.stdout


def test_incompatible_checkpoint_refused(straight, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    p = launch(tmp_path, out, "--set", "model.depth=3", "--set", "model.out_indices=[0,2]", nproc=1)
    assert p.returncode == 2
    err = p.stderr
    assert "incompatible recipe" in err and "model.depth: checkpoint 4 -> recipe 3" in err, err[-2000:]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_other_world_size_resumes_automatically(tmp_path, before, after):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    out = tmp_path / "out"
    ok(launch(tmp_path, out, "--max-steps", "6", nproc=before))  # global batch 16 in micro-batches of 4
    ckpts = out / "checkpoints"
    saved = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="global_step6")
    meta = json.loads((ckpts / "global_step6" / "mff_complete.json").read_text())
    samples = meta["batch"] * 4 * before  # of epoch 1, all ranks together
    p = ok(launch(tmp_path, out, "--max-steps", "8", nproc=after, dump=tmp_path / "first.pt"))
    log = p.stdout + p.stderr
    assert f"converted it for this world size to {ckpts / 'global_step6_universal'}" in log
    assert f"at step 6 (epoch 1, batch {samples // (4 * after)})" in log  # the same samples, other split
    resumed = torch.load(tmp_path / "first.pt", weights_only=True)
    assert resumed.keys() == saved.keys() and all(torch.equal(resumed[k], saved[k]) for k in saved)
    final = losses(out)
    assert sorted(s for s in final if s > 6) == [8] and final[8] == final[8]  # logging every 2 steps: 8 is next
    meta = json.loads((ckpts / "global_step8" / "mff_complete.json").read_text())
    assert (meta["world_size"], meta["step"]) == (after, 8)


def test_a_full_disk_on_one_rank_in_the_background_stops_every_rank_in_one_line(tmp_path):
    """Rank 1's background write fails (ENOSPC): both ranks report it, naming the file and the intact previous
    checkpoint, and exit; neither waits for the other until the collective timeout."""
    out = tmp_path / "out"
    ok(launch(tmp_path, out, "--max-steps", "4"))
    ckpts = out / "checkpoints"
    (ckpts / "global_step8").mkdir()
    bad = ckpts / "global_step8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    bad.symlink_to("/dev/full")  # every write: ENOSPC
    p = launch(tmp_path, out, "--max-steps", "8", timeout=180)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: could not write checkpoint")]
    assert errors and len(set(errors)) == 1, p.stderr[-3000:]  # one line, the same on every rank that says it
    assert errors[0].startswith(f"error: could not write checkpoint {ckpts / 'global_step8'}: {bad}: the disk is full")
    assert f"the previous complete checkpoint {ckpts / 'global_step4'} is intact" in errors[0]
    assert (ckpts / "latest").read_text() == "global_step4"
    assert not (ckpts / "global_step8" / "mff_complete.json").exists()
