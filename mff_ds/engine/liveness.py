"""A peer that stops answering ends the run in about a minute, not at the collective timeout (30 min by default),
and the run's last word names it.

Why our own: a collective waits for a frozen host (SIGSTOP, a cut link: no socket is closed) until its timeout, with
every GPU of the job idle; torch elastic's agent watches only its own node's processes, and nvidia-resiliency-ext's
rank monitors need its own launcher and a CUDA build. This is the small part they would give us: a heartbeat per rank
through the rendezvous store every run already has (the TCPStore at MASTER_ADDR:MASTER_PORT that the process group
started from: torchrun's agent, or rank 0 under the deepspeed launcher and srun), read by a thread of its own, so a
slow first step (compilation), a checkpoint save, an evaluation or a slow link never look like a loss.

- Every rank adds 1 to its key every `period` seconds from a daemon thread (its own TCPStore client, every call bounded
  in time, so a store that stops answering is noticed too).
- Rank 0 reads every rank's counter; one that has not moved for `lost_after` seconds (distributed.peer_timeout_s,
  45 s; MFF_DS_PEER_TIMEOUT_S wins) is lost. Rank 0 publishes the verdict (first writer wins) and every rank that
  reads it ends: one line (LOST_LINE), the torch elastic error file when torchrun set one, exit LOST_PEER_EXIT.
- Every other rank watches rank 0's counter and the store itself: rank 0's host lost (the store with it, or not)
  ends them the same way.
- A rank that stops with an error announces it (`failed`, or the excepthook for an uncaught exception): the others
  end at once naming it, after a short grace so that ranks failing together each say their own error.
- A collective that fails in the main thread (a killed peer's sockets reset) is explained by `explain`: the rank
  whose heartbeat stopped is named; an error no heartbeat explains is not a lost peer (it keeps its traceback).
- A rank that finishes (`done`, also at a clean interpreter exit) stops counting as a peer.
"""
import atexit
import datetime
import json
import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from mff_ds.common import UserError, write_text

LOST_PEER_EXIT = 69        # EX_UNAVAILABLE: a peer (rank, host, the rendezvous store) was lost; rerun to resume
TIMEOUT_ENV = "MFF_DS_PEER_TIMEOUT_S"
DEFAULT_LOST_AFTER_S = 45.0
DONE = 1 << 40             # added to a finished rank's counter
GRACE_S = 3.0              # before acting on another rank's error: ranks failing together say their own

_watch: Optional["Watch"] = None
_generation = 0
# name -> hook(line), run before a lost peer ends the process from the watch thread (os._exit skips every finally:
# the output dir's lock, goodput's accounting)
_on_end: Dict[str, Callable[[str], None]] = {}
_record: List[Optional[str]] = [None]  # where a lost peer's hosts and line are written (the run's output dir)


def lost_after_s(recipe_value: Optional[float] = None, environ=None) -> float:
    """Seconds without a heartbeat that make a peer lost: MFF_DS_PEER_TIMEOUT_S when set, else the recipe's
    distributed.peer_timeout_s, else 45; 0 turns the watch off."""
    import math
    env = os.environ if environ is None else environ
    v = env.get(TIMEOUT_ENV)
    if not v:
        return DEFAULT_LOST_AFTER_S if recipe_value is None else float(recipe_value)
    try:
        seconds = float(v)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UserError(f"{TIMEOUT_ENV}: expected a number of seconds >= 0 (0: off), got {v!r}")
    return seconds


def who(ranks: List[int], hosts: List[str]) -> str:
    """'rank 3 on node7', or 'node7 (ranks 2, 3), node9 (rank 5)'."""
    by_host = {}
    for r in sorted(ranks):
        by_host.setdefault(hosts[r] if r < len(hosts) else "?", []).append(r)
    if len(ranks) == 1:
        return f"rank {ranks[0]} on {hosts[ranks[0]] if ranks[0] < len(hosts) else '?'}"
    return ", ".join(f"{h} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})" for h, rs in by_host.items())


class Watch:
    """The heartbeat thread of one rank (module docstring). `step` is set by the training loop."""

    def __init__(self, rank: int, world: int, hosts: List[str], addr: str, port: int, lost_after: float,
                 period: Optional[float] = None, prefix: Optional[str] = None, grace: float = GRACE_S,
                 clock: Callable[[], float] = time.monotonic, end: Optional[Callable[[str], None]] = None):
        self.rank, self.world, self.hosts, self.addr, self.port = rank, world, hosts, addr, port
        self.lost_after, self.grace, self.clock = lost_after, grace, clock
        # what a rerun continues from, in words (the training loop sets it: the newest complete checkpoint)
        self.hint: Callable[[], str] = lambda: "no checkpoint yet"
        self.period = period or min(5.0, max(lost_after / 6, 0.05))
        self.op_timeout = min(10.0, max(lost_after / 3, 1.0))  # one store call (connect, add, get)
        global _generation
        _generation += 1  # a later watch of this process (another run in it) counts afresh: every rank agrees
        run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "run"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0"
        self.prefix = prefix or f"mff_ds/live/{run}/{attempt}/{_generation}"
        self.step: Optional[int] = None
        self._end = end or self._exit
        self._stop = threading.Event()
        self.verdict: Optional[tuple] = None  # (kind "lost" | "error", line, hosts) this rank ends with
        self._explaining = False  # the main thread explains a failed collective: it says the verdict itself
        self._store = None
        self._thread: Optional[threading.Thread] = None

    # -------------------------------------------------------------------------------- keys and the store
    def _key(self, what, rank=None):
        return f"{self.prefix}/{what}" + ("" if rank is None else f"/{rank}")

    def _connect(self):
        import torch.distributed as dist
        timeout = datetime.timedelta(seconds=self.op_timeout)
        return dist.TCPStore(self.addr, self.port, None, False, timeout=timeout, wait_for_workers=False)

    def store(self):
        if self._store is None:
            self._store = self._connect()
        return self._store

    def bounded(self, fn: Callable):
        """fn() (store calls) waited for at most op_timeout seconds, else TimeoutError. A TCPStore client's call
        blocks for ever, whatever its timeout, on a connection whose peer vanished without closing it (a host cut
        off or powered down; measured on tests/rigs/cluster.py), so every call runs in a thread of its own that is
        left behind (a daemon; the store is reconnected) when it does not return."""
        box = []

        def call():
            try:
                box.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 (handed to the caller)
                box.append((False, e))
        t = threading.Thread(target=call, name="mff-ds-liveness-call", daemon=True)
        t.start()
        t.join(self.op_timeout)
        if not box:
            self._store = None
            raise TimeoutError(f"the rendezvous store did not answer in {self.op_timeout:.0f} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def start(self) -> "Watch":
        def register():  # before anyone waits on it
            self.store().add(self._key("beat", self.rank), 1)
            if self.rank == 0:
                for r in range(self.world):
                    self.store().add(self._key("beat", r), 0)
        self.bounded(register)
        self._thread = threading.Thread(target=self._run, name="mff-ds-liveness", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------------------------------- the loop
    def _run(self):
        last_seen = {r: (None, self.clock()) for r in range(self.world)}  # counter, when it last moved
        contact = tick = self.clock()  # the last time the store answered; the end of this loop's last turn

        def beat():
            store = self.store()
            store.add(self._key("beat", self.rank), 1)
            verdict = self._read(store)
            if verdict is None:
                watched = range(self.world) if self.rank == 0 else [0]
                values = store.multi_get([self._key("beat", r) for r in watched])
                now = self.clock()
                for r, v in zip(watched, values):
                    if int(v) != last_seen[r][0]:
                        last_seen[r] = (int(v), now)
                lost = [r for r in watched if r != self.rank and (last_seen[r][0] or 0) < DONE
                        and now - last_seen[r][1] > self.lost_after]
                if lost:
                    verdict = self.lost(lost, f"no heartbeat for {self.lost_after:.0f} s")
            return verdict

        while not self._stop.wait(self.period):
            verdict = None
            if self.clock() - tick > 3 * self.period + 1.0:  # this process was stopped itself (SIGSTOP, a frozen
                contact = self.clock()                          # host): what it did not see meanwhile is no one
                last_seen = {r: (v, contact) for r, (v, _) in last_seen.items()}  # else's silence
            try:
                verdict = self.bounded(beat)
                contact = self.clock()
                if verdict is not None and verdict[0] == "error":  # ranks failing together say their own error
                    self._stop.wait(self.grace)
            except Exception as e:  # noqa: BLE001 (the store stopped answering: rank 0's host, or the link)
                self._store = None
                if self.clock() - contact > self.lost_after:
                    verdict = ("lost", self.lost_line([0], f"the rendezvous store at {self.addr}:{self.port} has "
                                                           f"not answered for {self.lost_after:.0f} s "
                                                           f"({type(e).__name__})"), [self.hosts[0]])
            tick = self.clock()
            if verdict is not None and not self._stop.is_set() and not self._explaining:
                self.verdict = verdict
                self._end(verdict[1])
                return

    def _read(self, store) -> Optional[tuple]:
        """The published verdict (kind, line, hosts), if any."""
        key = self._key("verdict")
        if not store.check([key]):
            return None
        return _parse(store.get(key).decode())

    def publish(self, kind: str, line: str, hosts: List[str]) -> tuple:
        """The verdict every rank ends with, (kind, line, hosts): the first one published (this, or an earlier)."""
        got = self.store().compare_set(self._key("verdict"), "", f"{kind}:" + json.dumps([line, hosts]))
        return _parse(got.decode())

    def lost(self, ranks: List[int], how: str) -> tuple:
        return self.publish("lost", self.lost_line(ranks, how), sorted({self.hosts[r] for r in ranks}))

    def lost_line(self, ranks: List[int], how: str) -> str:
        step = f"at step {self.step}" if self.step is not None else "during start-up"
        return (f"lost peer: {who(ranks, self.hosts)} ({how}) {step}; {self.hint()}; rerun "
                f"with --resume auto (leave out a host that is gone; the batch plan and a universal checkpoint "
                f"follow the new world size) [exit {LOST_PEER_EXIT}]")

    # ------------------------------------------------------------------------------ what the rank says
    def done(self) -> None:
        """This rank finished: it is no longer a peer to wait for."""
        if self._stop.is_set():
            return
        self.stop()
        try:
            self.bounded(lambda: self.store().add(self._key("beat", self.rank), DONE))
        except Exception:  # noqa: BLE001 (the store may be gone with rank 0, which also finished)
            pass

    def failed(self, line: str) -> None:
        """This rank stops with an error (said in `line`): the others end now, naming it."""
        if self._stop.is_set():
            return
        self.stop()
        try:
            text = (f"{who([self.rank], self.hosts)} stopped: {line.strip().splitlines()[-1][:300]}"
                    f"{'' if self.step is None else f' at step {self.step}'}; {self.hint()}")
            self.bounded(lambda: self.publish("error", text, []))
        except Exception:  # noqa: BLE001
            pass

    def explain(self, exc: BaseException, wait: Optional[float] = None) -> Optional[str]:
        """After `exc` ended the main thread (a collective failed): when a published verdict, or a heartbeat that
        stopped within `wait` seconds, explains it, say the verdict (`say`) and return its line; else None (not a
        lost peer: the error keeps its traceback)."""
        self._explaining = True  # this thread keeps beating (the others tell the lost from the living by it)
        # a living rank's counter moves within a period: two periods and a bit tell the lost from the living
        deadline = self.clock() + (2 * self.period + 0.5 if wait is None else wait)
        first, verdict = None, None
        try:
            while verdict is None:
                verdict, values = self.bounded(lambda: (self._read(self.store()), [int(v) for v in self.store(
                ).multi_get([self._key("beat", r) for r in range(self.world)])]))
                if verdict is not None:
                    break
                first = first or values
                if self.clock() >= deadline:
                    still = [r for r, v in enumerate(values) if r != self.rank and v == first[r] and v < DONE]
                    if still:
                        verdict = self.bounded(lambda: self.lost(still, f"a collective failed ({_short(exc)}) and "
                                                                        f"its heartbeat stopped"))
                    break
                time.sleep(min(self.period, 1.0))
        except Exception:  # noqa: BLE001 (no store: rank 0's host is gone with it)
            if self.rank != 0:
                verdict = ("lost", self.lost_line([0], f"a collective failed ({_short(exc)}) and the rendezvous "
                                                       f"store at {self.addr}:{self.port} does not answer"),
                           [self.hosts[0]])
        self._explaining = False
        if verdict is None:
            return None
        self.stop()
        self.verdict = verdict
        say(verdict[1], verdict[2] if verdict[0] == "lost" else None)
        return verdict[1]

    def _exit(self, line: str) -> None:
        """End this process now (the main thread may be blocked in a collective with the lost peer)."""
        kind, _, hosts = self.verdict
        say(line, hosts if kind == "lost" else None)
        for hook in list(_on_end.values()):
            try:
                hook(line)
            except Exception:  # noqa: BLE001 (ending is what matters)
                pass
        os._exit(LOST_PEER_EXIT)


def _parse(text: str) -> tuple:
    kind, payload = text.split(":", 1)
    line, hosts = json.loads(payload)
    return kind, line, hosts


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def say(line: str, hosts: Optional[List[str]] = None) -> None:
    """The run's last word: on stderr, in torch elastic's error file (torchrun's failure report shows it), and, for
    a lost peer (`hosts`: theirs), in OUTPUT_DIR/lost_peer.txt: the hosts on its first line, the line on the second
    (launch/slurm/pretrain.sbatch requeues the job, leaving them out)."""
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    record = _record[0] if hosts is not None and _record[0] and not os.path.exists(_record[0]) else None
    for path, text in ((os.environ.get("TORCHELASTIC_ERROR_FILE"), json.dumps({"message": line,
                                                                               "timestamp": int(time.time())})),
                       (record, " ".join(hosts or []) + "\n" + line + "\n")):  # the first rank's verdict stays
        if path:
            try:
                write_text(path, text)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------- the process's
def start(rank: int, world: int, hosts: List[str], addr: str, port: int, lost_after: float) -> Optional[Watch]:
    """This process's watch (started once per process group); None with one rank or when off."""
    global _watch
    if world <= 1 or lost_after <= 0:
        return None
    if _watch is not None and not _watch._stop.is_set():
        return _watch
    _watch = Watch(rank, world, hosts, addr, port, lost_after).start()
    atexit.register(_watch.done)
    hook = sys.excepthook

    def excepthook(kind, value, tb):  # an uncaught error ends this rank: the others hear of it now
        if _watch is not None:
            _watch.failed(f"{kind.__name__}: {value}")
        hook(kind, value, tb)
    sys.excepthook = excepthook
    return _watch


def current() -> Optional[Watch]:
    return _watch if _watch is not None and not _watch._stop.is_set() else None


def set_step(step: int) -> None:
    if _watch is not None:
        _watch.step = step


def on_end(name: str, hook: Optional[Callable[[str], None]]) -> None:
    """hook(line) runs when a lost peer ends this process from the watch thread (one hook per name: a later run of
    this process replaces its own; None removes it)."""
    if hook is None:
        _on_end.pop(name, None)
    else:
        _on_end[name] = hook


def set_record(path: Optional[str]) -> None:
    """Where a lost peer's hosts and line are written (say): OUTPUT_DIR/lost_peer.txt."""
    _record[0] = path


def set_hint(hint: Callable[[], str]) -> None:
    """What a rerun continues from, in words, when a peer is lost (the training loop: its newest checkpoint)."""
    if _watch is not None:
        _watch.hint = hint


def failed(line: str) -> None:
    """This rank stops with the error `line`: the other ranks end now, naming it (no-op without a watch)."""
    if current() is not None:
        _watch.failed(line)


def explain(exc: BaseException) -> Optional[str]:
    """The line naming a lost peer that explains `exc`, already said (`say`), or None (no watch, or not a lost
    peer)."""
    return _watch.explain(exc) if current() is not None else None
