"""Goodput: the share of a run's wall time, over every attempt of it (restarts after a failure or a stop signal),
spent on optimizer steps it keeps, and where the rest went.

Rank 0 keeps OUTPUT_DIR/goodput.json: one record per attempt (process start, the step it resumed from, start-up,
training and checkpoint-stall seconds, the last step logged and when, how it ended), written at every logging step,
checkpoint and end, so an attempt killed outright leaves what it did until its last line. From the records:

- steps:      training time of the steps the run keeps (a logging interval's wall time, hooks and checkpoints out);
- start-up:   process start to the first batch, every attempt;
- checkpoints: the loop's pause for saves;
- failures:   for an attempt that died (a lost peer, an error, a kill): its redone steps (logged after the
              checkpoint the next attempt resumed from) and the time from its last sign of life to the next
              attempt's start (detection, teardown, the launcher's or the scheduler's restart);
- restarts after a stop: the same gap after an attempt that stopped on a signal (preemption, time limit: requeue)
              or reached its --max-steps and was started again;
- other:      the rest (evaluation, exports, logging, the time between the last logged step and a stop).
Every metrics.jsonl line has `goodput` so far; the run's last console line and its summary give the breakdown;
docs/RESUME.md "Goodput" explains it.
"""
import json
import os
import time
from typing import List, Optional

from mff_ds.common import write_json

FILE = "goodput.json"


def _load(path: str) -> List[dict]:
    try:
        with open(path) as f:
            attempts = json.load(f)["attempts"]
        return [a for a in attempts if isinstance(a, dict) and "start" in a]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # none yet, or unreadable: goodput counts from this attempt


class Goodput:
    """This attempt's record (rank 0 writes; other ranks keep none)."""

    def __init__(self, output_dir: str, started: float, resumed_at: int, enabled: bool):
        self.path, self.enabled = os.path.join(output_dir, FILE), enabled
        self.attempts = _load(self.path) if enabled else []
        self.now = {"start": started, "resumed_at": resumed_at, "startup_s": 0.0, "train_s": 0.0,
                    "checkpoint_s": 0.0, "first": resumed_at, "last": resumed_at, "seen": time.time(),
                    "ended": None, "ended_at": None}
        self.attempts.append(self.now)
        self._write()

    def _write(self) -> None:
        if self.enabled:
            try:
                write_json(self.path, {"attempts": self.attempts}, indent=1)
            except OSError:  # accounting must never stop a run
                pass

    def startup(self, seconds: float) -> None:
        self.now["startup_s"] = seconds
        self._write()

    def trained(self, step: int, seconds: float) -> None:
        self.now.update(train_s=self.now["train_s"] + seconds, last=step, seen=time.time())
        self._write()

    def checkpoint(self, seconds: float) -> None:
        self.now.update(checkpoint_s=self.now["checkpoint_s"] + seconds, seen=time.time())
        self._write()

    def fraction(self) -> float:
        """Goodput so far (every attempt, up to now)."""
        return breakdown(self.attempts, time.time())["goodput"]

    def end(self, how: str) -> dict:
        """This attempt ended (`how`: done, stopped, lost peer, error); -> the run's breakdown so far."""
        if self.now["ended"] is None:
            self.now.update(ended=how, ended_at=time.time())
            self._write()
        return breakdown(self.attempts)


def breakdown(attempts: List[dict], now: Optional[float] = None) -> dict:
    """Seconds per category over every attempt (module docstring), and goodput = steps / wall."""
    out = {"wall_s": 0.0, "steps_s": 0.0, "startup_s": 0.0, "checkpoint_s": 0.0, "failure_s": 0.0,
           "failure_gap_s": 0.0, "redone_s": 0.0, "redone_steps": 0, "stop_gap_s": 0.0, "other_s": 0.0,
           "attempts": len(attempts), "goodput": None}
    if not attempts:
        return out
    for a, nxt in zip(attempts, attempts[1:] + [None]):
        out["startup_s"] += a["startup_s"]
        out["checkpoint_s"] += a["checkpoint_s"]
        redone, kept = 0, a["train_s"]
        if nxt is not None and a["last"] > nxt["resumed_at"]:  # steps the next attempt did again
            redone = a["last"] - max(nxt["resumed_at"], a["first"])
            share = redone / max(a["last"] - a["first"], 1)
            out["redone_s"] += a["train_s"] * share
            out["redone_steps"] += redone
            kept = a["train_s"] * (1 - share)
        out["steps_s"] += kept
        if nxt is not None:
            gap = max(nxt["start"] - (a["seen"] if a["ended"] in (None, "lost peer", "error") else
                                      a["ended_at"] or a["seen"]), 0.0)
            out["failure_gap_s" if a["ended"] in (None, "lost peer", "error") else "stop_gap_s"] += gap
    last = attempts[-1]
    end = now or last["ended_at"] or last["seen"]
    out["wall_s"] = max(end - attempts[0]["start"], 1e-9)
    out["failure_s"] = out["failure_gap_s"] + out["redone_s"]
    out["other_s"] = max(out["wall_s"] - out["steps_s"] - out["startup_s"] - out["checkpoint_s"] - out["failure_s"]
                         - out["stop_gap_s"], 0.0)
    out["goodput"] = out["steps_s"] / out["wall_s"]
    return out


def _t(s: float) -> str:
    if s < 9.95:
        return f"{s:.1f}s"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def line(b: dict) -> str:
    """The run's goodput in one line."""
    if b["goodput"] is None:
        return "goodput: nothing recorded"
    tries = f", {b['attempts']} attempts" if b["attempts"] > 1 else ""
    fail = (f", failures {_t(b['failure_s'])} (detection and restart {_t(b['failure_gap_s'])}, "
            f"{b['redone_steps']} redone step(s) {_t(b['redone_s'])})" if b["failure_s"] else "")
    stop = f", restarts after a stop {_t(b['stop_gap_s'])}" if b["stop_gap_s"] else ""
    return (f"goodput {100 * b['goodput']:.1f}% of {_t(b['wall_s'])}{tries}: steps {_t(b['steps_s'])}, start-up "
            f"{_t(b['startup_s'])}, checkpoints {_t(b['checkpoint_s'])}{fail}{stop}, other {_t(b['other_s'])}")
