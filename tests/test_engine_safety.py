"""Nothing executed, nothing mixed, nothing lost: safe loading, output-dir lock, --resume none, verified checkpoints,
signals. One process, a 2-block ViT on 32 px synthetic images: each run takes a few seconds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forkserver
from conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
# one process: 8 micro-batches per epoch, 2 per step -> 4 steps/epoch, 8 steps
TINY = tiny_recipe(seed=3, schedule={"epochs": 2}, checkpoint={"every_steps": 2, "keep_last": 3})


def pretrain(tmp: Path, out: Path, *args, timeout=120, **popen):
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY)
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(cfg), "--output-dir", str(out), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if popen:
        return forkserver.popen(cmd, env=env, cwd=tmp, text=True, **popen)
    return forkserver.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def error_lines(p) -> list:
    """stderr minus DeepSpeed's/torch's own warnings: what the user reads."""
    return [l for l in p.stderr.splitlines() if l.strip() and "[WARNING]" not in l and "Warning" not in l]


class Payload:
    """Unpickling this runs code: it creates the file `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def plant(path: Path, marker: Path) -> None:
    """An attacker's edit: the payload added to a DeepSpeed file, and the completion marker's checksum updated."""
    import hashlib
    sd = torch.load(path, map_location="cpu", weights_only=False)
    sd["extra"] = Payload(marker)
    torch.save(sd, path)
    done = path.parent / "mff_complete.json"
    meta = json.loads(done.read_text())
    meta.setdefault("files", {})[path.name] = [path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
    done.write_text(json.dumps(meta))


def test_resume_never_unpickles_code(tmp_path):
    out = tmp_path / "out"
    ok(pretrain(tmp_path, out, "--max-steps", "2"))
    pwned = tmp_path / "pwned"
    plant(out / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt", pwned)
    p = pretrain(tmp_path, out)
    assert not pwned.exists(), "the checkpoint's pickle payload was executed"
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    lines = error_lines(p)
    assert len(lines) == 1 and lines[0].startswith("error: refused to load"), p.stderr[-3000:]
    assert "mp_rank_00_model_states.pt" in lines[0] and "class/function exec," in lines[0]


def test_universal_dir_metadata_never_unpickles_code(tmp_path):
    from mff_ds.engine import checkpoint as ckpt
    tag = tmp_path / "global_step2_universal"
    (tag / "zero").mkdir(parents=True)
    torch.save({"mff_meta": {"step": 2}, "x": Payload(tmp_path / "pwned")}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointError, match="refused to load .*class/function exec,"):
        ckpt.find(str(tmp_path), str(tag))
    assert not (tmp_path / "pwned").exists()
    meta = {"step": 2, "compat": {"seed": 0}, "format_version": ckpt.FORMAT_VERSION}
    torch.save({"mff_meta": meta, "rng": torch.zeros(3)}, tag / "mp_rank_00_model_states.pt")
    assert ckpt.find(str(tmp_path), str(tag))[2] == dict(meta, universal=True)  # plain data still loads


def test_output_dir_is_locked_and_resume_none_never_mixes_runs(tmp_path):
    import signal
    import socket
    import time
    out = tmp_path / "out"
    a = pretrain(tmp_path, out, "--set", "schedule.epochs=1000", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not (out / ".mff_lock").exists() and a.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert a.poll() is None and (out / ".mff_lock").exists(), "the first run never took the lock"
        p = pretrain(tmp_path, out)  # a second run into the same dir, while the first one trains
        assert p.returncode == 2 and a.poll() is None
        lines = error_lines(p)
        assert len(lines) == 1 and f"is in use by another run (host {socket.gethostname()}, PID {a.pid}" in lines[0]
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    # the killed run's lock is stale: taken over, with its host and PID named; its outputs are moved aside
    p = ok(pretrain(tmp_path, out, "--resume", "fresh", "--max-steps", "2"))
    assert f"took over the stale lock {out / '.mff_lock'} of host {socket.gethostname()}, PID {a.pid}: process " \
           f"{a.pid} no longer exists" in p.stderr
    aside = list(out.glob("previous-*"))
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").exists() and "moved the previous run's outputs" in p.stdout
    assert (out / "checkpoints" / "latest").read_text() == "global_step2" and not (out / ".mff_lock").exists()
    assert [q.name for q in (out / "checkpoints").glob("global_step*")] == ["global_step2"]
    # --resume none over those outputs: refused, nothing touched, the way out named
    before = sorted(str(q.relative_to(out)) for q in out.rglob("*"))
    p = pretrain(tmp_path, out, "--resume", "none")
    assert p.returncode == 2
    lines = error_lines(p)
    assert len(lines) == 1 and "would mix the two runs" in lines[0] and "--resume fresh" in lines[0], p.stderr[-2000:]
    assert sorted(str(q.relative_to(out)) for q in out.rglob("*")) == before


def test_damaged_checkpoints_fall_back_to_an_intact_one(tmp_path):
    out = tmp_path / "out"
    ok(pretrain(tmp_path, out, "--max-steps", "6"))  # checkpoints 2, 4, 6
    ck = out / "checkpoints"
    meta = json.loads((ck / "global_step6" / "mff_complete.json").read_text())
    assert set(meta["files"]) == {q.name for q in (ck / "global_step6").iterdir()} - {"mff_complete.json"}
    (ck / "global_step6" / "mff_complete.json").write_text('{"step": 6, "fil')           # corrupt marker
    optim = next((ck / "global_step4").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])                 # truncated
    p = ok(pretrain(tmp_path, out, "--max-steps", "8"))
    err = p.stderr
    assert f"checkpoint {ck / 'global_step6'} is damaged" in err and "mff_complete.json is unreadable" in err
    assert f"checkpoint {ck / 'global_step4'} is damaged" in err and f"{optim.name} has " in err
    assert "at step 2 (epoch 0, batch 4)" in p.stdout + err
    assert (ck / "latest").read_text() == "global_step8"
    # every checkpoint damaged (one byte changed, same size): one clear error, nothing resumed
    for tag in ck.glob("global_step*"):
        model = tag / "mp_rank_00_model_states.pt"
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 1
        model.write_bytes(bytes(data))
    p = pretrain(tmp_path, out)
    assert p.returncode == 2
    lines = error_lines(p)
    assert lines[-1].startswith(f"error: no complete checkpoint under {ck} is intact"), p.stderr[-3000:]
    assert "another SHA-256" in lines[-1] and "--resume fresh" in lines[-1]


@pytest.mark.parametrize("background", ["true", "false"])
def test_full_disk_on_save_names_the_path_and_the_intact_checkpoint(tmp_path, background):
    """The same one line whether the file is written in the background (checkpoint.async) or by the loop."""
    out = tmp_path / "out"
    mode = ("--set", f"checkpoint.async={background}")
    ok(pretrain(tmp_path, out, "--max-steps", "2", *mode))
    ck = out / "checkpoints"
    (ck / "global_step4").mkdir()
    (ck / "global_step4" / "mp_rank_00_model_states.pt").symlink_to("/dev/full")  # every write: ENOSPC
    p = pretrain(tmp_path, out, "--max-steps", "4", *mode)
    assert p.returncode == 2
    lines = error_lines(p)
    # the planted, marker-less global_step4 is named as incomplete when the run resumes from global_step2
    assert lines[:-1] == [f"warning: checkpoint {ck / 'global_step4'} is incomplete (no mff_complete.json: its save "
                          f"did not finish); resuming from the newest complete one, {ck / 'global_step2'}"], lines
    assert lines[-1].startswith(f"error: could not write checkpoint {ck / 'global_step4'}: ")
    assert "the disk is full" in lines[-1]
    assert f"the previous complete checkpoint {ck / 'global_step2'} is intact" in lines[-1]
    assert (ck / "latest").read_text() == "global_step2"
    assert json.loads((out / "recipe.yaml").read_text().split("async: ")[1].split()[0]) == (background == "true")


def _wait_for(path: Path, proc, what: str):
    import time
    deadline = time.time() + 120
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None and path.exists(), f"the run ended or stalled before {what}"


@pytest.mark.parametrize("sig, code", [("SIGTERM", 75), ("SIGINT", 130)])
def test_sigterm_and_sigint_save_and_exit(tmp_path, sig, code):
    import signal
    out = tmp_path / "out"
    p = pretrain(tmp_path, out, "--set", "schedule.epochs=1000", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(out / "metrics.jsonl", p, "training started")
    p.send_signal(getattr(signal, sig))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == code, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and f"stopped by {sig} at step " in stdout
    step = int(stdout.split(f"stopped by {sig} at step ")[1].split("/")[0])
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{step}"


def test_a_signal_during_start_up_is_kept_not_fatal(tmp_path):
    import signal
    out = tmp_path / "out"
    p = pretrain(tmp_path, out, "--set", "schedule.epochs=1000", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(out / "recipe.yaml", p, "the recipe was saved")  # before the model and the engine are built
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 75 and "stopped by SIGUSR1 at step 10/" in stdout, stdout[-2000:] + stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "global_step10"


def test_second_sigint_exits_at_once(tmp_path):
    script = ("import os, signal, sys, time\n"
              f"sys.path.insert(0, {str(REPO)!r})\n"
              "from mff_ds.engine import signals\n"
              "signals.catch()\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(0.1)\n"
              "os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C forwarded by torchrun: ignored\n"
              "print('first kept', flush=True)\n"
              "time.sleep(signals.SECOND_SIGINT_AFTER_S)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(30)\n"
              "print('not reached')\n")
    p = forkserver.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 130 and p.stdout == "first kept\n", p.stdout + p.stderr
    assert p.stderr.startswith("second SIGINT: exiting now without saving")


# ------------------------------------------------------------------ one clear line instead of a traceback
def test_bad_config_files_get_one_line(tmp_path):
    from mff_ds.engine.recipe import RecipeError
    from mff_ds.pretrain.recipe import load_recipe
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    cases = {str(tmp_path / "empty.yaml"): "is empty; expected a recipe",   # not silently ViT-B defaults
             str(tmp_path): "expected a readable YAML file, got",          # a directory
             str(tmp_path / "binary.yaml"): "expected a readable YAML file, got"}
    for path, want in cases.items():
        with pytest.raises(RecipeError, match=want):
            load_recipe(path, world_size=1)
    (tmp_path / "tiny.yaml").write_text(TINY)
    for ratio in (0.0, 0.99):  # masks none (the loss is 0/0) / keeps none of the 16 patches
        with pytest.raises(RecipeError, match="model.mask_ratio: (masks|keeps) no patch of 16"):
            load_recipe(str(tmp_path / "tiny.yaml"), [f"model.mask_ratio={ratio}"], world_size=1)


def test_missing_shards_are_named(tmp_path):
    from mff_ds.data import DataConfig, build_loader
    cfg = DataConfig(source="webdataset", path=str(tmp_path / "shard-{000..003}.tar"), num_workers=0)
    with pytest.raises(ValueError, match=r"expected existing shard files, got 4 of 4 missing .* e\.g\. .*shard-000"):
        build_loader(cfg, img_size=32, micro_batch=4, rank=0, world_size=1, seed=0, epoch=0)


def test_convert_and_evaluate_on_files_that_are_not_checkpoints(tmp_path):
    from mff_ds import convert
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(os.urandom(3000))
    (tmp_path / "random.safetensors").write_bytes(os.urandom(3000))
    for name in ("empty.pth", "random.pth", "random.safetensors"):
        with pytest.raises(ValueError, match=f"cannot read .*{name}: expected a"):
            convert.read_file(tmp_path / name)
        p = forkserver.run([sys.executable, "-m", "mff_ds.convert", "to-timm", str(tmp_path / name),
                            str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    p = forkserver.run([sys.executable, str(REPO / "launch" / "evaluate.py"), str(tmp_path / "random.pth"), "--val",
                        str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert p.returncode == 2 and error_lines(p) == [l for l in error_lines(p) if l.startswith("error: cannot read")]


def test_convert_from_mae_reads_our_own_files(tmp_path):
    from mff_ds import convert
    from mff_ds.models import build_model
    model = build_model("mff_vit_tiny_patch16", img_size=32, patch_size=8, depth=4, out_indices=[0, 2, 3])
    for suffix in (".pth", ".safetensors"):
        convert.save_model(model, tmp_path / f"ours{suffix}")
        back = convert.load_mae(tmp_path / f"ours{suffix}")
        assert back.cfg.out_indices == [0, 2, 3] and back.cfg.to_dict() == model.cfg.to_dict()


def test_resume_with_changed_settings(tmp_path):
    out = tmp_path / "out"
    ok(pretrain(tmp_path, out, "--max-steps", "2"))
    p = pretrain(tmp_path, out, "--set", "deepspeed.zero_stage=0")
    assert p.returncode == 2
    lines = error_lines(p)
    assert len(lines) == 1 and "was saved with ZeRO stage 2, this run uses stage 0" in lines[0], p.stderr[-3000:]
    # data-loader speed settings and the weight decay may change: accepted, and the changes are listed
    p = ok(pretrain(tmp_path, out, "--max-steps", "4", "--set", "data.num_workers=1", "--set", "data.pin_memory=false",
                    "--set", "data.prefetch_factor=4", "--set", "optim.weight_decay=0.1"))
    assert "at step 2" in p.stdout and "warning: resuming" in p.stderr
    for change in ("data.num_workers: checkpoint 0 -> recipe 1", "data.pin_memory: checkpoint True -> recipe False",
                   "data.prefetch_factor: checkpoint 2 -> recipe 4", "optim.weight_decay: checkpoint 0.05 -> recipe 0.1"):
        assert change in p.stderr
    # the data stream itself may not: refused, and the way out named
    p = pretrain(tmp_path, out, "--set", "data.num_samples=128")
    assert p.returncode == 2 and "data.num_samples: checkpoint 64 -> recipe 128" in p.stderr
    assert "--resume fresh" in p.stderr


def test_unreadable_training_data_is_one_line(tmp_path):
    bad = tmp_path / "images" / "cls"
    bad.mkdir(parents=True)
    for i in range(64):
        (bad / f"{i}.jpg").write_bytes(b"not a jpeg")
    p = pretrain(tmp_path, tmp_path / "out", "--set", "data.source=imagefolder", "--set", f"data.path={bad.parent}")
    assert p.returncode == 2
    lines = error_lines(p)
    assert lines[-1].startswith("error: 64 of 64 samples could not be read"), p.stderr[-3000:]
    assert all(l.startswith("warning: rank 0: skipped a bad sample") for l in lines[:-1])  # rate-limited: a few


# ------------------------------------------------------------------ exports, skipped samples
def test_exports_honour_the_umask(tmp_path):
    from mff_ds import convert
    old = os.umask(0o022)
    try:
        convert.save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
        convert.save_file({"w": torch.zeros(2)}, tmp_path / "a.pth")
        os.umask(0o027)
        convert.save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.safetensors": 0o644, "a.pth": 0o644, "b.safetensors": 0o640}


def test_skipped_samples_are_named_in_a_rate_limited_line(tmp_path, capsys):
    from PIL import Image

    from mff_ds.data import DataConfig, build_loader
    root = tmp_path / "images" / "cls"
    root.mkdir(parents=True)
    for i in range(16):
        Image.new("RGB", (40, 40), (i * 10, 0, 0)).save(root / f"{i:02d}.jpg")
    for name in ("bad1.jpg", "bad2.jpg"):
        (root / name).write_bytes(b"not a jpeg")
    cfg = DataConfig(source="imagefolder", path=str(root.parent), num_workers=0, max_bad_fraction=0.5)
    loader = build_loader(cfg, img_size=32, micro_batch=6, rank=0, world_size=1, seed=0, epoch=0)
    n = sum(len(x) for x, _ in loader)
    assert n == 18 and loader.bad_samples == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if "skipped a bad sample" in l]
    assert len(lines) == 1 and "bad" in lines[0].split("batch: ")[1] and ".jpg" in lines[0]  # names the file, once


def test_evaluation_skips_and_names_an_unreadable_image(tmp_path, capsys):
    from PIL import Image

    from mff_ds.eval import data as edata
    from mff_ds.eval.metrics import evaluate
    from mff_ds.eval.recipe import AugConfig, EvalData
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(tmp_path / c / f"{i}.jpg")
    (tmp_path / "b" / "9_broken.jpg").write_bytes(b"not a jpeg")
    d = EvalData(source="imagefolder", val_path=str(tmp_path), num_workers=0)
    loader, source = edata.build_val_loader(d, edata.val_transform(32, AugConfig()), batch=7, rank=0, world=1)
    res = evaluate(lambda x: torch.zeros(len(x), 2), loader, torch.device("cpu"))
    assert source.classes == ["a", "b"] and res["val_samples"] == 6
    assert f"skipped unreadable validation image {tmp_path / 'b' / '9_broken.jpg'}" in capsys.readouterr().err


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path, capsys):
    from mff_ds.engine.rundir import LOCK_NAME, OutputLock, RunDirError
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "start": 0.0}))  # PIDs of other hosts: unknowable
    with pytest.raises(RunDirError, match="in use by another run \\(host node-17, PID 4242"):
        OutputLock(str(path)).acquire()
    old = path.stat().st_mtime - 3600  # no heartbeat for an hour (> MFF_DS_LOCK_STALE_S = 600 s)
    os.utime(path, (old, old))
    lock = OutputLock(str(path)).acquire()
    try:
        assert "took over the stale lock" in capsys.readouterr().err
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirError):  # held: a second acquire in this very process is refused too
            OutputLock(str(path)).acquire()
    finally:
        lock.release()
    assert not path.exists()
