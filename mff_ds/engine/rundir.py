"""One run per output directory, and a fresh start never mixes with an older run.

Lock: `<output-dir>/.mff_lock`, created by global rank 0 with O_CREAT|O_EXCL and holding host, PID and start time;
a heartbeat thread touches it every HEARTBEAT_S seconds and it is removed when the run ends. O_EXCL creation is atomic
on local disks, NFSv3+ and Lustre, whereas fcntl/flock locks are unreliable there (NFS needs a working lockd; Lustre
gives local-only or ENOSYS locks unless mounted with -o flock) and cannot say who holds them. A lock is stale, and
is taken over with a warning naming its host and PID, when its process is gone (same host) or its heartbeat is older
than MFF_DS_LOCK_STALE_S (default 600 s; another host, whose PIDs we cannot check).

--resume none in a directory holding another run's outputs (checkpoints, metrics, exports) is refused, since the
two runs would mix (old tags outliving new ones, pruning, `latest`); --resume fresh moves those outputs aside into
`<output-dir>/previous-<UTC time>/` first.
"""
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
from typing import Optional

from mff_ds.common import UserError, startup_phase

from . import liveness

LOCK_NAME = ".mff_lock"
LOST_PEER_FILE = "lost_peer.txt"  # a lost peer's hosts and line (engine/liveness.say; the sbatch script reads it)
HEARTBEAT_S = 30.0
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "model_fp32.safetensors", "encoder_timm.safetensors",
               "best.safetensors", "tensorboard")
_held = set()  # lock paths this process holds: a lock naming our own PID but not listed here is a leftover


def lost_hosts(output_dir: str, since=None) -> list:
    """The hosts the run's lost-peer record (engine/liveness.py) names, when it was written after `since` (a time.time;
    None: any): a restart after a lost peer may take over their locks at once."""
    path = os.path.join(output_dir, LOST_PEER_FILE)
    try:
        if isinstance(since, (int, float)) and os.stat(path).st_mtime < since:
            return []
        with open(path) as f:
            return f.readline().split()
    except OSError:
        return []


class RunDirError(UserError):
    """The output directory cannot be used by this run; the message says why and what to do."""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class OutputLock:
    def __init__(self, path: str):
        self.path = path
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _stale_reason(self, holder: dict, age: float) -> Optional[str]:
        """Why the lock of `holder` (heartbeat `age` seconds ago) is stale, or None while it is live."""
        limit = float(os.environ.get("MFF_DS_LOCK_STALE_S", 600))
        lost = lost_hosts(os.path.dirname(self.path), holder.get("start"))
        if holder.get("host") in lost:
            return f"its host was lost ({os.path.join(os.path.dirname(self.path), LOST_PEER_FILE)})"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            if holder["pid"] == self.me["pid"]:
                return None if self.path in _held else "left behind by an earlier run in this process"
            return None if _alive(holder["pid"]) else f"process {holder['pid']} no longer exists"
        return f"no heartbeat for {age:.0f} s (> MFF_DS_LOCK_STALE_S={limit:.0f})" if age > limit else None

    def acquire(self) -> "OutputLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            _held.add(self.path)
            self._thread = threading.Thread(target=self._beat, name="mff-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise RunDirError(f"could not create the lock {self.path}: other runs keep taking it")

    def _take_over_if_stale(self) -> None:
        try:
            age = time.time() - os.stat(self.path).st_mtime
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return  # released meanwhile: retry
        try:
            holder = json.loads(text)
        except ValueError:  # being written right now, or damaged: only its age can tell
            holder = {}
        who = f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}"
        reason = self._stale_reason(holder, age)
        if reason is None:
            started = f", started {_when(holder['start'])}" if isinstance(holder.get("start"), (int, float)) else ""
            raise RunDirError(
                f"output dir {os.path.dirname(self.path)} is in use by another run ({who}{started}; lock "
                f"{self.path}, heartbeat {age:.0f} s ago). Wait for it to finish, stop it, or use another --output-dir.")
        aside = f"{self.path}.stale-{self.me['host']}-{self.me['pid']}"
        try:
            os.rename(self.path, aside)  # atomic: of several contenders one moves it, the others retry
        except FileNotFoundError:
            return
        with open(aside) as f:
            if f.read() != text:  # a contender already replaced it with its own live lock: put that back
                os.rename(aside, self.path)
                return
        os.remove(aside)
        print(f"warning: took over the stale lock {self.path} of {who}: {reason}", file=sys.stderr, flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # a full or flaky file system: the run goes on, the lock may look stale later
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _held.discard(self.path)
        try:
            with open(self.path) as f:
                mine = json.load(f) == self.me
        except (OSError, ValueError):
            return
        if mine:
            os.remove(self.path)


def _outputs(output_dir: str) -> list:
    return [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, n))]


def _prepare(output_dir: str, resume: str) -> str:
    """Refuse --resume none over another run's outputs; --resume fresh moves them aside. Returns the resume mode."""
    if resume not in ("none", "fresh"):
        return resume
    found = _outputs(output_dir)
    if not found:
        return "none"
    if resume == "none":
        raise RunDirError(
            f"output dir {output_dir} holds another run's outputs ({', '.join(found)}); starting afresh there "
            f"(--resume none) would mix the two runs. Continue that run with --resume auto, move its outputs aside "
            f"and start afresh with --resume fresh, or use another --output-dir.")
    aside = os.path.join(output_dir, "previous-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(aside)
    for name in sorted(os.listdir(output_dir)):
        if name != LOCK_NAME and not name.startswith("previous-"):
            os.rename(os.path.join(output_dir, name), os.path.join(aside, name))
    print(f"--resume fresh: moved the previous run's outputs to {aside}", flush=True)
    return "none"


def claim(output_dir: str, resume: str, rank: int):
    """Collective. Rank 0 locks the output dir and applies the --resume none/fresh rules; every rank raises the
    same RunDirError when it cannot. Returns (lock or None on other ranks, resume mode for the run)."""
    from .distributed import all_gather_object
    lock, err = None, None
    if rank == 0:
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock = OutputLock(os.path.join(output_dir, LOCK_NAME)).acquire()
            resume = _prepare(output_dir, resume)
        except (RunDirError, OSError) as e:
            err = str(e) if isinstance(e, RunDirError) else f"output dir {output_dir}: {e}"
            if lock is not None:
                lock.release()
    err, resume = all_gather_object((err, resume))[0]
    if err:
        raise RunDirError(err)
    return lock, resume


def owns_output_dir(fn):
    """Decorator for a run's entry point `fn(recipe, output_dir, ..., resume=...)`: the output dir is locked for the
    whole call, and --resume none/fresh are checked/applied before `fn` starts."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .distributed import init_distributed
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        # the process group starts here, before `fn`: with the recipe's collective timeout (fn's first argument is
        # the recipe or a task holding it) and the flight recorder's dumps in the output dir
        first = next(iter(bound.arguments.values()), None)
        distributed = getattr(getattr(first, "recipe", first), "distributed", None)
        with startup_phase("distributed_init"):  # (the trainer's start-up timeline reports it)
            rank = init_distributed(getattr(distributed, "timeout_s", None), bound.arguments["output_dir"],
                                    getattr(distributed, "peer_timeout_s", None)).rank
        lock, bound.arguments["resume"] = claim(bound.arguments["output_dir"], bound.arguments["resume"], rank)
        if lock is not None:  # a lost peer ends the process from the watch thread: no finally runs there
            liveness.on_end("lock", lambda line: lock.release())
        try:
            return fn(*bound.args, **bound.kwargs)
        finally:
            if lock is not None:
                liveness.on_end("lock", None)
                lock.release()
    return wrapper
