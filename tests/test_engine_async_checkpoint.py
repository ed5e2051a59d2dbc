"""Asynchronous checkpoints (checkpoint.async): the loop trains on while a save is written in the background, the
marker follows the fsync of every file, a stop signal during a background write still ends with complete
checkpoints, too little host memory falls back to synchronous saves in one line, the time-based interval, and
markers of either digest verify. In process on the 30-line regression task, or one process of the tiny pretraining
(seconds each); the 2-rank runs of tests/test_engine_resume.py save asynchronously too (the default)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import forkserver
from conftest import tiny_recipe
from test_engine_loop import Regression, RegressionRecipe, recipe

from mff_ds.engine import checkpoint as ckpt
from mff_ds.engine.recipe import validate
from mff_ds.engine.trainer import Loop, fit

REPO = Path(__file__).resolve().parents[1]


class Recipe(RegressionRecipe):
    def compat_dict(self):  # as the shipped kinds: how checkpoints are written is no part of what a resume compares
        return {k: v for k, v in self.to_dict().items() if k != "checkpoint"}


def with_checkpoint(**keys):
    r = validate(Recipe, recipe().to_dict(), world_size=1, source="test")  # 3 epochs of 2 steps; a checkpoint
    return r.model_copy(update={"checkpoint": r.checkpoint.model_copy(update=keys)})  # every step, keep 2


class Gated(Regression):
    """Records the steps the loop took; `reached` is set once the loop has taken step `gate`."""
    def __init__(self, recipe, gate):
        super().__init__(recipe)
        self.gate, self.reached, self.log = gate, threading.Event(), []

    def after_step(self, run, out):
        super().after_step(run, out)
        self.log.append(("step", run.step))
        if run.step >= self.gate:
            self.reached.set()


def test_the_loop_trains_on_during_a_background_write_and_the_marker_follows_fsync(tmp_path, monkeypatch):
    task = Gated(with_checkpoint(), gate=3)
    write, fsync, mark = ckpt.write_file, os.fsync, ckpt.write_json
    held = {}

    def slow_write(state_dict, path, zipfile):  # global_step2's file waits (bounded) until the loop took step 3
        if "global_step2" in path and threading.current_thread() is not threading.main_thread():
            held[path] = task.reached.wait(60)
        task.log.append(("write", path))
        return write(state_dict, path, zipfile)

    def recording_fsync(fd):
        task.log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_marker(path, obj, **kw):
        task.log.append(("marker", str(path)))
        return mark(path, obj, **kw)
    monkeypatch.setattr(ckpt, "write_file", slow_write)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(ckpt, "write_json", recording_marker)
    out = tmp_path / "run"
    summary = fit(task, str(out), resume="none")
    assert summary["step"] == 6 and held and all(held.values()), held  # step 3 came while step 2 was being written
    log = task.log
    marker2 = log.index(("marker", str(out / "checkpoints" / "global_step2" / "mff_complete.json")))
    assert log.index(("step", 3)) < marker2  # the loop went on before global_step2 was complete
    assert [r["async"] for r in summary["checkpoints"]] == [True] * 6
    assert [r["step"] for r in summary["checkpoints"]] == [1, 2, 3, 4, 5, 6]
    assert all(r["bytes"] > 0 and r["write_s"] >= 0 and r["stall_s"] >= 0 for r in summary["checkpoints"])
    for tag in ("global_step5", "global_step6"):  # keep_last 2
        d = out / "checkpoints" / tag
        meta = json.loads((d / "mff_complete.json").read_text())
        at = log.index(("marker", str(d / "mff_complete.json")))
        assert meta["digest"] == "sha256" and meta["files"]
        for name, (size, digest) in meta["files"].items():  # taken while writing, equal to a re-read
            assert (d / name).stat().st_size == size
            assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest
            if name.endswith(".pt"):  # our writes: written and fsynced before the marker
                assert log.index(("fsync", str(d / name))) < at
        assert log.index(("fsync", str(d))) < at  # and the directory entries
    assert (out / "checkpoints" / "latest").read_text() == "global_step6"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [c["step"] for m in lines for c in m.get("checkpoints", [])]
    assert logged == sorted(logged) and set(logged) <= {1, 2, 3, 4, 5} and all("loss" in m for m in lines)


def test_async_and_synchronous_saves_resume_alike(tmp_path):
    """Files written in the background load as the loop's own: an async-saved run resumed synchronously and the
    reverse end on the weights of a straight run."""
    straight = fit(Regression(with_checkpoint()), str(tmp_path / "straight"), resume="none")
    for first, second in ((True, False), (False, True)):
        out = str(tmp_path / f"run_{first}")
        fit(Regression(with_checkpoint(async_=first)), out, max_steps=3, resume="none")
        again = fit(Regression(with_checkpoint(async_=second)), out, resume="auto")
        assert torch.equal(again["weight"], straight["weight"])
        assert [r["async"] for r in again["checkpoints"]] == [second] * 3
        lines = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        resumed = [m["startup"]["phases"] for m in lines if "startup" in m][-1]  # finding + checksumming, loading
        assert resumed["checkpoint_verify"] > 0 and resumed["restore"] > 0
        assert ("checkpoint_snapshot" in resumed) == second  # the snapshot's buffers, after the first step


def test_too_little_host_memory_falls_back_to_synchronous_saves_in_one_line(tmp_path, monkeypatch, capsys):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:     500000 kB\n")  # 0.48 GiB < 1 GiB headroom
    monkeypatch.setattr(ckpt.AsyncSaver, "MEMINFO", str(meminfo))
    summary = fit(Regression(with_checkpoint()), str(tmp_path / "run"), resume="none")
    err = [line for line in capsys.readouterr().err.splitlines() if "checkpoint.async" in line]
    assert len(err) == 1 and err[0].startswith("warning: checkpoint.async: the snapshots need "), err
    assert "0.48 GiB is available there (MemAvailable); saving synchronously" in err[0]
    assert [r["async"] for r in summary["checkpoints"]] == [False] * 6
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "global_step6"


def test_snapshot_memory_is_said_at_the_start(tmp_path, capsys):
    fit(Regression(with_checkpoint()), str(tmp_path / "run"), resume="none")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint.async:")]
    assert len(said) == 1 and "the snapshot holds 0.00 GiB of host memory on rank 0" in said[0]
    assert ckpt.snapshot_bytes(SimpleNamespace(module=torch.nn.Linear(3, 1), optimizer=None)) == 16


@pytest.mark.parametrize("minutes, steps", [(1e-9, [1, 2, 3, 4, 5, 6]), (1000.0, [6])])
def test_a_time_based_interval(tmp_path, minutes, steps):
    summary = fit(Regression(with_checkpoint(every_steps=0, every_minutes=minutes)), str(tmp_path / "run"),
                  resume="none")
    assert [r["step"] for r in summary["checkpoints"]] == steps


def test_time_due_counts_from_the_last_save():
    s = SimpleNamespace(task=SimpleNamespace(recipe=with_checkpoint(every_minutes=1.0)))
    s.last_save_time = time.monotonic() - 61
    assert Loop.time_due(s)
    s.last_save_time = time.monotonic() - 50
    assert not Loop.time_due(s)
    s.task.recipe = with_checkpoint(every_minutes=0.0)
    s.last_save_time = 0.0
    assert not Loop.time_due(s)  # 0: off


def _agree(rank, world, store, out):
    import torch.distributed as dist

    from mff_ds.engine.signals import StopOnSignal
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    stopper = StopOnSignal(every=2)
    flags = (rank == 0, rank == 1)  # rank 0's clock says due; rank 1's background save failed
    got = [stopper.check(step, None, flags) for step in (1, 2)]
    Path(out, str(rank)).write_text(json.dumps(got))
    dist.destroy_process_group()


def test_ranks_agree_on_a_timed_save_and_a_failed_one_at_the_signal_check(tmp_path):
    """Rank 0's 'a timed checkpoint is due' and any rank's 'a background save failed' reach every rank in the
    stop-signal all-reduce, on its check steps only (no collective on the others)."""
    import torch.multiprocessing as mp
    mp.start_processes(_agree, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / str(rank)).read_text())
        assert got == [[False, [0, 0]], [False, [1, 1]]], (rank, got)


def test_markers_of_either_digest_verify(tmp_path):
    d = tmp_path / "global_step1"
    d.mkdir()
    (d / "a.pt").write_bytes(b"weights")
    base = {"step": 1, "compat": {}}

    def marker(**kw):
        (d / ckpt.MARKER).write_text(json.dumps(dict(base, **kw)))
        return ckpt.verified_meta(str(d))
    sha, md5 = hashlib.sha256(b"weights").hexdigest(), hashlib.md5(b"weights").hexdigest()
    assert marker(files={"a.pt": [7, sha]})[1] is None  # written before markers named their digest: SHA-256
    assert marker(files={"a.pt": [7, sha]}, digest="sha256")[1] is None
    assert marker(files={"a.pt": [7, md5]}, digest="md5")[1] is None  # the one the marker names
    assert marker(files={"a.pt": [7, md5]})[1] == "a.pt has another SHA-256 than when it was written"
    assert "its digest 'nohash' is not one this Python's hashlib has" in marker(files={}, digest="nohash")[1]


# ------------------------------------------------------------------ a stop signal during a background write
TINY = tiny_recipe(seed=3, schedule={"epochs": 1000}, checkpoint={"every_steps": 2, "keep_last": 3})
# global_step2's background write says that it started, then takes 3 s; waits for it are said after 0.5 s
WRAPPER = """
import os, sys, threading, time, runpy
sys.path.insert(0, {repo!r})
import torch
from mff_ds.engine import checkpoint
checkpoint.WAIT_SAY_S = 0.5
_save = torch.save
def save(obj, f, *a, **k):
    if "global_step2" in str(f) and threading.current_thread() is not threading.main_thread():
        open({flag!r}, "w").close()
        time.sleep(3)
    return _save(obj, f, *a, **k)
torch.save = save
sys.argv = ["pretrain.py"] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_sigterm_during_a_background_write_ends_with_complete_checkpoints(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    flag = tmp_path / "writing"
    (tmp_path / "run.py").write_text(WRAPPER.format(repo=str(REPO), flag=str(flag),
                                                    script=str(REPO / "launch" / "pretrain.py")))
    out = tmp_path / "out"
    p = forkserver.popen([sys.executable, str(tmp_path / "run.py"), "--config", str(tmp_path / "tiny.yaml"),
                          "--output-dir", str(out)], env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                                                            MFF_DS_STOP_CHECK_EVERY="1"),
                         cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not flag.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None and flag.exists(), "the run ended or stalled before global_step2 was written"
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 75 and "Traceback" not in stderr, stdout[-2000:] + stderr[-2000:]
    step = int(stdout.split("stopped by SIGTERM at step ")[1].split("/")[0])
    ck = out / "checkpoints"
    assert step > 2 and (ck / "latest").read_text() == f"global_step{step}"
    assert (ck / "global_step2" / ckpt.MARKER).is_file() and (ck / f"global_step{step}" / ckpt.MARKER).is_file()
    assert f"waiting for the background write of checkpoint {ck / 'global_step2'} to finish before " in stderr
    for tag in ("global_step2", f"global_step{step}"):  # intact: every file as its marker says
        assert ckpt.verified_meta(str(ck / tag))[1] is None
