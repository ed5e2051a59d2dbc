"""Save and stop on a signal: SLURM's warning before the time limit (`--signal=USR1@120`) or a preemption notice.

The handler only records the signal. `StopOnSignal.requested(step)` is a collective (a MAX all-reduce of one
integer every `every` optimizer steps), so every rank stops at the same step even when only some ranks got the
signal; the trainer then saves a checkpoint and exits with EXIT_PREEMPTED, and `--resume auto` continues.
"""
import os
import signal
from typing import Iterable, Optional

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; launch/slurm/pretrain.sbatch requeues the job on it
DEFAULT_SIGNALS = ("SIGUSR1",)


def _parse(names: Iterable[str]) -> list:
    out = []
    for n in names:
        n = n.strip().upper()
        if not n:
            continue
        name = n if n.startswith("SIG") else "SIG" + n
        if not hasattr(signal, name):
            raise ValueError(f"MFF_DS_STOP_SIGNALS: expected signal names like USR1,TERM, got {n!r}")
        out.append(getattr(signal, name))
    return out


class StopOnSignal:
    """Install with `StopOnSignal.install()` (main thread) before the loop; poll `requested(step)` each step."""

    def __init__(self, signals: Optional[Iterable[str]] = None, every: Optional[int] = None):
        names = signals if signals is not None else os.environ.get("MFF_DS_STOP_SIGNALS", ",".join(DEFAULT_SIGNALS)).split(",")
        self.signals = _parse(names)
        self.every = max(1, int(every if every is not None else os.environ.get("MFF_DS_STOP_CHECK_EVERY", 10)))
        self.received: Optional[int] = None
        self.stopped_by: Optional[str] = None
        self._previous = {}

    @classmethod
    def install(cls, signals=None, every=None) -> "StopOnSignal":
        self = cls(signals, every)
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def requested(self, step: int, device=None) -> bool:
        """Collective on multi-rank runs (call it on every rank at every step): True on every rank once any
        rank received a stop signal, checked every `every` steps."""
        if step % self.every:
            return False
        got = self.received or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([got], dtype=torch.long, device=device or "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            got = int(t.item())
        if got:
            self.stopped_by = signal.Signals(got).name
        return bool(got)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
