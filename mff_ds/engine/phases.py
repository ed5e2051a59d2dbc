"""Where a run's time goes: its start-up timeline (process start to the first optimizer step) and the time of each
phase of a training step (forward, backward, optimizer), both taken without adding a host-device synchronisation
to the steps.

`StartupClock` times the start-up as consecutive phases: each mark gives the time since the previous one to a phase,
so the phases add up to the wall time from the process start. Lower layers (the data index) time their own work
with `mff_ds.common.startup_phase`; the time they add to `STARTUP` during a phase of the clock is moved out of that
phase into their own. `PhaseTimer` times the steps (docstring there).
"""
import os
import time
from typing import Callable, Optional

from mff_ds.common import STARTUP

_LOADED = time.time()  # the fallback start where /proc is not there: this module's import, after torch's
_FIRST_RUN = [True]  # only the first run of a process counts its imports
ORDER = ("imports", "distributed_init", "checkpoint_verify", "recipe_check", "data_index", "model_build",
         "engine_init", "restore", "first_batch", "first_step", "checkpoint_snapshot")
# shown only when the run timed one: finding and verifying a checkpoint to resume, loading it, allocating the
# asynchronous saves' host buffers
ONLY_WHEN_THERE = ("checkpoint_verify", "restore", "checkpoint_snapshot")


def process_start(proc: str = "/proc") -> Optional[float]:
    """The time.time() at which this process started, from the kernel, or None where /proc cannot tell.

    Field 22 of /proc/self/stat is the start in clock ticks after boot; the boot time is taken from /proc/uptime
    (1/100 s) where it is readable, else from btime in /proc/stat (whole seconds)."""
    try:
        with open(os.path.join(proc, "self", "stat")) as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(")") + 1:].split()[19])  # after the command name, which may hold spaces
        started = ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(os.path.join(proc, "uptime")) as f:
            return time.time() - float(f.read().split()[0]) + started
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(os.path.join(proc, "stat")) as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + started
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class StartupClock:
    """This rank's start-up, phase -> seconds, the phases consecutive: mark(name) gives the time since the previous
    mark (the process start for the first run of a process, when this clock was made for a later one) to `name`,
    less what lower layers added to STARTUP meanwhile, which goes to their own phases."""

    def __init__(self):
        self.t0, self.lower = time.time(), dict(STARTUP)
        if _FIRST_RUN[0]:  # from the process start: what lower layers timed since then is this run's
            _FIRST_RUN[0] = False
            self.t0, self.lower = min(process_start() or _LOADED, self.t0), {}
        self.last, self.phases = self.t0, {}

    def mark(self, name: str) -> None:
        now = time.time()
        took = now - self.last
        for k, v in STARTUP.items():
            added = v - self.lower.get(k, 0.0)
            if added > 0 and k != name:
                self.add(k, min(added, took))
                took -= min(added, took)
        self.lower = dict(STARTUP)
        self.add(name, took)
        self.last = now

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(seconds, 0.0)

    def move(self, seconds: float, src: str, dst: str) -> None:
        """`seconds` of phase src belong to dst (the loader waits inside the first optimizer step)."""
        seconds = min(max(seconds, 0.0), self.phases.get(src, 0.0))
        self.phases[src] -= seconds
        self.add(dst, seconds)

    def timeline(self) -> dict:
        """{"total_s", "phases"}: the trainer's phases in their order (restore and checkpoint_snapshot only when there
        was one, the data index 0 when the data layer built none), then any other phase a lower layer timed."""
        phases = {k: self.phases.get(k, 0.0) for k in ORDER if k in self.phases or k not in ONLY_WHEN_THERE}
        phases.update((k, v) for k, v in self.phases.items() if k not in phases)
        return {"total_s": sum(phases.values()), "phases": phases}


def startup_record(timelines: list) -> dict:
    """Every rank's timeline -> the run's record: the slowest rank's total and phases, every rank's total."""
    totals = [t["total_s"] for t in timelines]
    slowest = max(range(len(totals)), key=totals.__getitem__)
    return {"total_s": totals[slowest], "slowest_rank": slowest, "phases": timelines[slowest]["phases"],
            "per_rank_total_s": totals}


def startup_line(record: dict) -> str:
    """`start-up 41.2 s (slowest: rank 1): imports 3.1 s, distributed_init 0.4 s, ...`"""
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in record["phases"].items())
    return f"start-up {record['total_s']:.1f} s (slowest: rank {record['slowest_rank']}): {phases}"


class _HostEvent:
    """A CPU stand-in for torch.cuda.Event: the host clock at record(), always done."""
    __slots__ = ("t",)

    def record(self) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def elapsed_time(self, end) -> float:
        return 1000.0 * (end.t - self.t)  # ms, as CUDA events


class PhaseTimer:
    """The time of each phase of the training steps (forward, backward, optimizer), summed until `take()`.

    On CUDA the host runs ahead of the device: a host clock around a phase would time the kernel launches, and
    waiting for the device (a synchronize) to time it would stall the launch queue on every step. So each micro-batch
    records CUDA events on the current stream, one before its forward and one at the end of each phase (events come
    from a pool and go back to it once read), and `take()` reads only the events whose query() says the device has
    passed them: no host-device synchronisation is added. At a logging step, after the loop's mean-loss sync, those
    of the interval are normally done; any that are not are read at the next take() (one interval late). On the CPU
    the same code runs on host-clock events that are always done.

    start() before the forward, lap(phase) at the end of each phase; the last phase (`optimizer`) closes the
    micro-batch. take(steps) -> {phase}_time: the seconds read per optimizer step, for `steps` steps."""
    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, device=None, event: Optional[Callable] = None):
        if event is None:
            if getattr(device, "type", "cpu") == "cuda":
                import torch
                event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
            else:
                event = _HostEvent
        self.new_event, self.pool = event, []
        self.open, self.pending = None, []  # this micro-batch's events; closed micro-batches not read yet
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    def _record(self):
        e = self.pool.pop() if self.pool else self.new_event()
        e.record()
        return e

    def start(self) -> None:
        if self.open:  # a micro-batch that raised before its last phase: its events were never closed
            self.pool.extend(self.open)
        self.open = [self._record()]

    def lap(self, phase: str) -> None:
        if self.open is None:
            return
        self.open.append(self._record())
        if len(self.open) == len(self.PHASES) + 1:
            self.pending.append(self.open)
            self.open = None

    def read(self) -> None:
        """Add the phases of the micro-batches the device has finished (in order) to the sums."""
        done = 0
        for events in self.pending:
            if not events[-1].query():  # the stream runs in order: neither this one nor a later one is done
                break
            for phase, a, b in zip(self.PHASES, events, events[1:]):
                self.seconds[phase] += a.elapsed_time(b) / 1000.0
            self.pool.extend(events)
            done += 1
        del self.pending[:done]

    def take(self, steps: int) -> dict:
        """The phases read so far per optimizer step over `steps` steps, as metrics; the sums restart."""
        self.read()
        out = {f"{p}_time": s / max(steps, 1) for p, s in self.seconds.items()}
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        return out

    def reset(self) -> None:
        """Forget what was timed (a rollback restarts the interval); events not done yet are left to the collector."""
        self.read()
        self.pending.clear()
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
