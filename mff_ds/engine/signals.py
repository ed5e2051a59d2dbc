"""Save and stop on a signal: SLURM's warning before the time limit (`--signal=USR1@120`), a preemption or `scancel`
(SIGTERM), or Ctrl-C (SIGINT).

The handler only records the signal. `StopOnSignal.requested(step)` is a collective (a MAX all-reduce of one
integer every `every` optimizer steps), so every rank stops at the same step even when only some ranks got the
signal (`check()` carries the trainer's other per-rank decisions in the same all-reduce: a timed checkpoint, a
failed background save); the trainer then saves a checkpoint and `launch/pretrain.py` exits with `exit_code()`: 75
(EX_TEMPFAIL, "try again": launch/slurm/pretrain.sbatch requeues the job on it) after SIGUSR1/SIGTERM, 130 after
SIGINT (the user asked to stop; no requeue). `--resume auto` continues either way. A second SIGINT, a second or
more after the first, exits at once (130) without saving; one within a second is the same Ctrl-C forwarded by
torchrun, and ignored.

`catch()` installs the handlers; launch/pretrain.py calls it before importing torch, so a signal during start-up is
kept and honoured at the first check instead of killing the process. This module imports torch lazily for that.

Work that saves nothing to resume (the feature probes, evaluation, conversion, downloads) has nothing to poll: it
runs inside `raising()`, where a stop signal raises `Stopped` in the main thread at once (75 for SIGUSR1/SIGTERM:
"try again", 130 for SIGINT; nothing saved, rerun the command).
"""
import contextlib
import os
import signal
import sys
import time
from typing import Iterable, Optional, Tuple

EXIT_PREEMPTED = 75   # SIGUSR1 / SIGTERM: saved, requeue and resume
EXIT_INTERRUPTED = 130  # SIGINT: saved (or, on a second SIGINT, not), stop
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")
SECOND_SIGINT_AFTER_S = 1.0

_first = []      # [(signum, monotonic time)] of the first stop signal this process received
_previous = {}   # signum -> the handler before catch()


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


def _names(signals: Optional[Iterable[str]]) -> Iterable[str]:
    return signals if signals is not None else os.environ.get("MFF_DS_STOP_SIGNALS", ",".join(DEFAULT_SIGNALS)).split(",")


def _handle(signum, frame):
    if not _first:
        _first.append((signum, time.monotonic()))
    elif signum == signal.SIGINT and time.monotonic() - _first[0][1] > SECOND_SIGINT_AFTER_S:
        print("second SIGINT: exiting now without saving; the last complete checkpoint is kept", file=sys.stderr,
              flush=True)
        os._exit(EXIT_INTERRUPTED)


def catch(signals: Optional[Iterable[str]] = None) -> None:
    """Install the stop handlers (main thread; idempotent). A signal received from now on is kept until release()."""
    for s in _parse(_names(signals)):
        if s not in _previous:
            _previous[s] = signal.signal(s, _handle)


def release() -> None:
    """Put the previous handlers back and forget any received signal."""
    for s, h in _previous.items():
        signal.signal(s, h)
    _previous.clear()
    _first.clear()


def exit_code(stopped_by: str) -> int:
    return EXIT_INTERRUPTED if stopped_by == "SIGINT" else EXIT_PREEMPTED


class Stopped(BaseException):
    """A stop signal inside `raising()`. A BaseException, as KeyboardInterrupt is: `except Exception` (e.g. around
    one unreadable image) does not swallow it. `.signal`: its name; `.exit_code`: 75, or 130 for SIGINT."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum).name
        self.exit_code = exit_code(self.signal)
        super().__init__(f"stopped by {self.signal}")


@contextlib.contextmanager
def raising(signals: Optional[Iterable[str]] = None):
    """Within the block (main thread), a stop signal raises Stopped at once, and one that catch() kept before the
    block (during start-up) raises as it begins. After the first, further stop signals are ignored while the
    exception unwinds (a data loader shutting its workers down), except a second SIGINT a second or more later,
    which exits at once (130); the handler then stays. A block that ends otherwise puts the previous handlers back.
    A process forked inside the block (a data-loader worker) gets KeyboardInterrupt instead, as Python's default
    SIGINT gives: a worker then exits quietly, and the main process ends the others."""
    sigs = _parse(_names(signals))
    owner, got = os.getpid(), []

    def handle(signum, frame):
        if os.getpid() != owner:
            raise KeyboardInterrupt
        if not got:
            got.append(time.monotonic())
            raise Stopped(signum)
        if signum == signal.SIGINT and time.monotonic() - got[0] > SECOND_SIGINT_AFTER_S:
            print("second SIGINT: exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)

    previous = {s: signal.signal(s, handle) for s in sigs}
    try:
        if _first and _first[0][0] in sigs:
            got.append(time.monotonic())
            raise Stopped(_first[0][0])
        yield
    finally:
        if got:
            _end_children()
        else:
            for s, h in previous.items():
                signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler not set from Python


def _end_children() -> None:
    """SIGTERM to the processes this one started through multiprocessing (data-loader workers: KeyboardInterrupt
    there, on which a worker exits quietly), instead of waiting for them to finish work that nobody will use."""
    mp = sys.modules.get("multiprocessing")
    for child in mp.active_children() if mp is not None else ():
        child.terminate()


class StopOnSignal:
    """Install with `StopOnSignal.install()` (main thread) before the loop; poll `requested(step)` each step."""

    def __init__(self, every: Optional[int] = None):
        self.every = max(1, int(every if every is not None else os.environ.get("MFF_DS_STOP_CHECK_EVERY", 10)))
        self.stopped_by: Optional[str] = None

    @classmethod
    def install(cls, signals=None, every=None) -> "StopOnSignal":
        catch(signals)
        return cls(every)

    @property
    def received(self) -> Optional[int]:
        return _first[0][0] if _first else None

    def requested(self, step: int, device=None) -> bool:
        """Collective on multi-rank runs (call it on every rank at every step): True on every rank once any
        rank received a stop signal, checked every `every` steps."""
        return self.check(step, device)[0]

    def check(self, step: int, device=None, flags: tuple = ()) -> Tuple[bool, tuple]:
        """requested(), and the MAX over the ranks of each of `flags` (small non-negative ints), agreed in the same
        all-reduce: what every rank must decide alike at the same step (the trainer's "a timed checkpoint is due",
        from rank 0's clock, and "a background save failed", from any rank). On several ranks both come only on
        the check steps (every `every` steps; the flags read 0 elsewhere): no host sync on the other steps. On one
        rank the flags come back as given, every step."""
        import torch
        import torch.distributed as dist
        many = dist.is_initialized() and dist.get_world_size() > 1
        if step % self.every:
            return False, (tuple(int(f) for f in flags) if not many else (0,) * len(flags))
        got = [self.received or 0, *(int(f) for f in flags)]
        if many:
            t = torch.tensor(got, dtype=torch.long, device=device or "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            got = t.tolist()
        if got[0]:
            self.stopped_by = signal.Signals(got[0]).name
        return bool(got[0]), tuple(got[1:])

    def restore(self) -> None:
        release()
