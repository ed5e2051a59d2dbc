"""Checkpoints: DeepSpeed save/load with client state, a completion marker, an atomic `latest`, keep-last-K,
and the consolidated fp32 weights of a checkpoint (what a task exports at the end).

DeepSpeed's own `latest` file is written by rank 0 with a plain open('w') before the other ranks finish their
ZeRO shards, so a kill can leave it pointing at a half-written checkpoint. We save with save_latest=False;
after every rank has returned, rank 0 writes `<tag>/mff_complete.json` and then replaces `latest`
atomically. Only tags with the marker are ever resumed from.

The marker lists every file of the checkpoint with its size and SHA-256, taken while the file is written (no second
pass over the files; the few files DeepSpeed copies itself are read once), and each file is fsynced before the marker
is written. On resume the newest complete checkpoint whose files all match is used; a damaged one (truncated,
emptied, changed, unreadable marker) is reported with its reason and the next older one is tried, and a newer one
without a marker (a save that was cut short) is named.
A failed write (disk full, no permission) is caught on every rank, so no rank waits in a barrier for one that
failed, and reported with the path and the previous complete checkpoint, which is left intact.

Asynchronous saves (checkpoint.async, `AsyncSaver`): the loop pays only for a snapshot of the rank's state in host
memory (torch's StateDictStager, the one behind torch.distributed.checkpoint's DefaultStager: one host buffer per
storage, kept and reused from save to save, views and shared storages preserved, pinned and copied on a side stream on
CUDA); a background thread writes the very files DeepSpeed would (its save_checkpoint runs as usual, only its
checkpoint engine's save() is redirected), hashes and fsyncs them, and completes the save with the same protocol as
the synchronous path over a gloo group of its own (a collective of the loop's group could interleave with the loop's).
At most one save is in flight: the next save, the final one, a rollback and the end of the run wait for it.
"""
import contextlib
import copy
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import numpy as np
import torch

from mff_ds.common import write_json, write_text

from . import ds_compat
from .distributed import all_gather_object, barrier
from .safe_load import CheckpointError, weights_only_loads  # noqa: F401 (CheckpointError: re-exported)
from .schedule import LEGACY

MARKER = "mff_complete.json"
# The completion marker's layout. 2: it records `format_version` and `parameter_alignment`, and the task's state is
# the client state's "task" entry. 3: its recipe records `schedule.reference`. 1 (no format_version: mff-ds 0.1.0
# before 2026-12-02) and 2 are read through `migrate`; a marker without a `compat` record is older still and refused.
# 4: its compat record binds the data index keys even when they are None (data.index, data.train_index,
# data.val_index) and data.allow_missing; older markers left a None index out: they trained on the folder's listing.
FORMAT_VERSION = 4
# what a run whose marker predates format 4 trained with (no list file; nothing left out)
DATA_KEYS_BEFORE_4 = {"pretrain": {"index": None, "allow_missing": False},
                      "eval": {"train_index": None, "val_index": None, "allow_missing": False}}
TAG_RE = re.compile(r"^global_step(\d+)$")


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def complete_tags(root: str) -> List[Tuple[int, str]]:
    """(step, tag) of every checkpoint under root that has its completion marker, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = TAG_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def read_meta(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, MARKER)) as f:
        return json.load(f)


def _rank_world() -> Tuple[int, int]:
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# The digest of the marker's file list. SHA-256 runs at about 1.8 GB/s on one core with the SHA extensions (x86
# SHA-NI, ARMv8); it is taken while the file is written, in the background for asynchronous saves, so its speed costs
# the loop nothing (docs/PERFORMANCE.md: BLAKE3 is not in hashlib, and a faster non-cryptographic one would only
# shorten the verification on resume). A marker records the algorithm ("digest"); one without it is SHA-256.
DIGEST = "sha256"
HASH_THREADS = 4      # files one rank hashes at once when it verifies a checkpoint (hashlib releases the GIL)
WAIT_SAY_S = 5.0      # a wait for a background save longer than this is said, once
WRITER_NICE = 10      # the background writer's niceness on Linux: where cores are short, the loop's threads win


def _digest(path: str, algorithm: str = DIGEST) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _shared(names: list, work, group=None) -> dict:
    """Collective (over `group`): {name: work(name)}, each rank doing every world-th name, a few at once."""
    rank, world = _rank_world()
    mine = names[rank::world]
    with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(mine)))) as pool:
        done = dict(zip(mine, pool.map(work, mine)))
    out = {}
    for part in _gather(done, group):
        out.update(part)
    return out


def _gather(obj, group=None) -> list:
    """all_gather_object over `group` (None: the world's), or [obj] on one rank."""
    import torch.distributed as dist
    if group is None:
        return all_gather_object(obj)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _listing(tag_dir: str) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), tag_dir) for d, _, fs in os.walk(tag_dir) for f in fs
                  if f != MARKER and not f.startswith("."))


def file_digests(tag_dir: str, written: Optional[dict] = None, group=None) -> dict:
    """Collective: {relative path: [size, digest]} of every file under tag_dir except the marker. `written`: this
    rank's files whose size and digest were taken while writing them; only the others (the scripts DeepSpeed copies,
    files of an untested checkpoint engine) are read to hash them."""
    known = {}
    for part in _gather(written or {}, group):
        known.update(part)
    names = _gather(_listing(tag_dir), group)[0]  # rank 0's listing: another node's directory cache may lag
    rest = [n for n in names if n not in known]
    known.update(_shared(rest, lambda n: [os.path.getsize(os.path.join(tag_dir, n)),
                                          _digest(os.path.join(tag_dir, n))], group))
    return dict(sorted(known.items()))


def verified_meta(tag_dir: str) -> Tuple[Optional[dict], Optional[str]]:
    """Collective: (marker, None) when every file the marker lists has its size and checksum, else (None, reason).
    A marker without a file list (written before checksums were recorded) is accepted as it is; one without a
    `digest` (before asynchronous saves) lists SHA-256."""
    try:
        meta = read_meta(tag_dir)
        files = meta.get("files", {})
        if not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
            raise ValueError("its file list is malformed")
        algorithm = meta.get("digest", "sha256")
        if algorithm not in hashlib.algorithms_available:
            raise ValueError(f"its digest {algorithm!r} is not one this Python's hashlib has")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"its {MARKER} is unreadable ({e})"

    def check(name):
        path = os.path.join(tag_dir, name)
        size, digest = files[name]
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, expected {size}"
        return None if _digest(path, algorithm) == digest else \
            f"{name} has another {'SHA-256' if algorithm == 'sha256' else algorithm} than when it was written"

    problems = [p for p in _shared(sorted(files), check).values() if p]
    return (None, "; ".join(problems)) if problems else (meta, None)


def _write_error(path: str, e: Exception) -> str:
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        usage = shutil.disk_usage(os.path.dirname(path))
        why = f"the disk is full or over quota ({usage.free / 2**30:.2f} GiB free)"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "no permission to write there"
    else:
        why = "write failed"
    return f"{path}: {why}: {e}"


class _DigestFile:
    """What torch.save writes into: every buffer goes to the file and into the digest and the byte count at once,
    so the marker's checksums cost no second pass over the file (torch.save writes its zip archive sequentially)."""

    def __init__(self, f, path: str):
        self.f, self.name, self.hash, self.size = f, path, hashlib.new(DIGEST), 0

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        self.hash.update(mv)  # hashlib and the file write release the GIL on large buffers: the loop runs on
        self.size += mv.nbytes
        return self.f.write(mv)

    def flush(self) -> None:
        self.f.flush()

    def __repr__(self):
        return f"<_DigestFile {self.name}>"


def write_file(state_dict, path: str, zipfile: bool) -> list:
    """torch.save(state_dict) to `path`, flushed and fsynced -> [size, digest], taken while writing. Python's file
    object keeps the errno (ENOSPC, EACCES) that torch's own writer turns into 'unexpected pos'."""
    with open(path, "wb") as f:
        out = _DigestFile(f, path)
        torch.save(state_dict, out, _use_new_zipfile_serialization=zipfile)
        f.flush()
        os.fsync(f.fileno())
    return [out.size, out.hash.hexdigest()]


def _fsync_dirs(paths) -> None:
    """The directory entries of the files written: durable before a marker vouches for them."""
    for d in sorted({os.path.dirname(p) for p in paths}):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _recording_writer(engine, errors: list, written: dict, tag_dir: str):
    """DeepSpeed writes every file and then meets the other ranks in a barrier: an exception on one rank would leave
    the others waiting there until the collective timeout. This writer records the error instead (the caller gathers
    them), and each file's size and digest, taken while writing it, in `written`."""
    zipfile = ds_compat.zipfile_serialization(engine)

    def save(state_dict, path):
        try:
            written[os.path.relpath(path, tag_dir)] = write_file(state_dict, path, zipfile)
        except (OSError, RuntimeError) as e:
            errors.append(_write_error(path, e))
    return ds_compat.checkpoint_writes_through(engine, save)


def _failure(errors: list, root: str, tag_dir: str) -> str:
    """The one line that reports a failed save: the first error, how many more, and the previous complete one."""
    prev = [t for _, t in complete_tags(root) if os.path.join(root, t) != tag_dir]
    keep = (f"the previous complete checkpoint {os.path.join(root, prev[-1])} is intact; free space or fix "
            f"permissions, then rerun with --resume auto" if prev else "there is no earlier complete checkpoint")
    return (f"could not write checkpoint {tag_dir}: {errors[0]}"
            f"{f' (and {len(errors) - 1} more)' if len(errors) > 1 else ''}; {keep}.")


def _raise_if_failed(errors: list, root: str, tag_dir: str, group=None) -> None:
    """Collective: every rank raises the same CheckpointError when any rank failed."""
    errors = [e for part in _gather(errors, group) for e in part]
    if errors:
        raise CheckpointError(_failure(errors, root, tag_dir))


def _complete(root: str, tag_dir: str, step: int, meta: dict, files: dict, keep_last: int) -> Optional[str]:
    """Rank 0, once every rank's files are durable: the marker (fsynced), then `latest`, then keep_last pruning
    (only now that the new checkpoint is complete). Returns the error of a failed marker write, else None."""
    try:
        write_json(os.path.join(tag_dir, MARKER), dict(meta, step=step, time=time.time(), digest=DIGEST,
                                                        files=files), indent=1, fsync=True)
        write_text(os.path.join(root, "latest"), os.path.basename(tag_dir), fsync=True)
    except OSError as e:
        return _write_error(os.path.join(tag_dir, MARKER), e)
    for _, old in complete_tags(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    # half-written tags older than the newest complete one are garbage too
    newest = complete_tags(root)[-1][0]
    for name in os.listdir(root):
        m = TAG_RE.match(name)
        if m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(root, name, MARKER)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return None


def _begin(engine, root: str, tag_dir: str) -> None:
    """Collective: the checkpoints root exists and an earlier marker of this tag is gone (overwriting: incomplete
    until saved again)."""
    errors = []
    if engine.global_rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(os.path.join(tag_dir, MARKER)):
                os.remove(os.path.join(tag_dir, MARKER))
        except OSError as e:
            errors.append(_write_error(root, e))
    _raise_if_failed(errors, root, tag_dir)


def save(engine, root: str, step: int, client_state: dict, meta: dict, keep_last: int, saver=None,
         stats: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory. With an AsyncSaver the files are written in
    the background (complete once `saver.wait()` returns without raising); without, complete on return. `stats`
    gets "bytes" (all ranks' files) and "write_s" when the save is complete."""
    tag_dir = os.path.join(root, f"global_step{step}")
    waited = saver.wait("the next save") if saver is not None else 0.0  # at most one in flight; raises its failure
    if stats is not None:
        stats["wait_s"] = waited
    t = time.perf_counter()
    _begin(engine, root, tag_dir)
    if saver is not None:
        saver.snapshot(engine, root, tag_dir, step, client_state, meta, keep_last, stats)
        return tag_dir
    errors, written = [], {}
    with _recording_writer(engine, errors, written, tag_dir):
        engine.save_checkpoint(root, tag=os.path.basename(tag_dir), client_state=client_state, save_latest=False)
    if not errors:
        _fsync_dirs([os.path.join(tag_dir, n) for n in written] or [tag_dir])
    _raise_if_failed(errors, root, tag_dir)  # every rank's files are on disk, or every rank raises
    files = file_digests(tag_dir, written)
    if engine.global_rank == 0:
        err = _complete(root, tag_dir, step, meta, files, keep_last)
        errors += [err] if err else []
    _raise_if_failed(errors, root, tag_dir)
    if stats is not None:
        stats.update(bytes=sum(size for size, _ in files.values()), write_s=time.perf_counter() - t)
    barrier()
    return tag_dir


# ------------------------------------------------------------------ asynchronous saves
def snapshot_bytes(engine) -> int:
    """Host bytes one snapshot of this rank's state takes: every distinct storage of its module's and optimizer's
    state dicts, and Adam's two moments for parameters whose optimizer state does not exist yet (torch creates it
    at the first step)."""
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if torch.is_tensor(x):
            st = x.untyped_storage()
            if (x.device, st.data_ptr()) not in seen:
                seen.add((x.device, st.data_ptr()))
                total += st.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(engine.module.state_dict())
    opt = engine.optimizer
    walk(opt.state_dict() if opt is not None else {})
    base = getattr(opt, "optimizer", opt)
    for group in getattr(base, "param_groups", []):
        total += sum(2 * p.numel() * 4 for p in group["params"] if not getattr(base, "state", {}).get(p))
    return total


def _stager():
    """torch's own staging class (the engine of torch.distributed.checkpoint's public DefaultStager, whose own
    stage() would copy on the compute stream and synchronize the whole device for every file): one host storage per
    source storage, cached across saves (bounded: one copy of the state), views and shared storages kept as they
    are, so torch.save writes the same bytes as from the live state. A private module: None where a torch lacks it."""
    try:
        from torch.distributed.checkpoint._state_dict_stager import StateDictStager
        return StateDictStager
    except ImportError:
        return None


def mem_available(meminfo: str = "/proc/meminfo") -> Optional[int]:
    """MemAvailable in bytes (what can be allocated without swapping), or None where the kernel does not say."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class AsyncSaver:
    """Asynchronous saves for one run (checkpoint.async). `make()` builds it on every rank, or returns None (with one
    line) where a save must stay synchronous. Then ckpt.save(..., saver=it) takes the snapshot and returns; `wait()`
    joins the save in flight (raising its failure on every rank); `take_done()` hands over the stats of finished
    saves. The background thread's collectives run over a gloo group of their own, bounded by its timeout."""
    MEMINFO = "/proc/meminfo"
    HEADROOM = 2**30  # left free beyond the snapshots of this node's ranks

    def __init__(self, engine, world: int, device, timeout_s: float):
        import datetime
        import torch.distributed as dist
        cuda = device.type == "cuda"
        self.stager = _stager()(pin_memory=cuda)
        # CUDA (untested here: no GPU in CI): the copies to pinned memory run on a side stream that first waits
        # for the compute stream; snapshot() ends with one synchronize of that stream, the one host sync a
        # snapshot needs, and keeps the source tensors referenced until then (none is freed mid-copy)
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) if world > 1
                      else None)
        self.timeout_s, self.rank = timeout_s, engine.global_rank
        self.zipfile = ds_compat.zipfile_serialization(engine)
        self.thread, self.tag_dir, self.root = None, None, None
        self.failure: Optional[str] = None
        self.done: list = []    # stats of saves completed in the background, for the metrics (list.append: atomic)
        self._held = []  # CUDA: the sources of the copies in flight

    @classmethod
    def make(cls, engine, world: int, device, timeout_s: float, is_main: bool, say=print) -> Optional["AsyncSaver"]:
        """Collective. An AsyncSaver (its snapshot buffers allocated by warm()), or None where
        asynchronous saves cannot run: another checkpoint engine, or too little host memory on some node for the
        snapshots of all its ranks (MemAvailable, 1 GiB left over). Every rank decides alike from the same data."""
        import socket
        need = snapshot_bytes(engine)
        infos = all_gather_object((socket.gethostname(), need, mem_available(cls.MEMINFO),
                                   ds_compat.can_write_through(engine), _stager() is not None))
        why = None
        if not all(i[3] for i in infos):
            why = f"DeepSpeed's {type(engine.checkpoint_engine).__name__} writes the files itself"
        elif not all(i[4] for i in infos):
            why = f"torch {torch.__version__} has no torch.distributed.checkpoint._state_dict_stager.StateDictStager"
        for host in dict.fromkeys(i[0] for i in infos):
            mine = [i for i in infos if i[0] == host]
            node_need, avail = sum(i[1] for i in mine), min((i[2] for i in mine if i[2] is not None), default=None)
            if why is None and avail is not None and node_need + cls.HEADROOM > avail:
                why = (f"the snapshots need {node_need / 2**30:.2f} GiB of host memory on {host} ({len(mine)} rank(s); "
                       f"{max(i[1] for i in mine) / 2**30:.2f} GiB the largest) and 1 GiB left over, but only "
                       f"{avail / 2**30:.2f} GiB is available there (MemAvailable)")
        if why:
            if is_main:  # a warning: printed for quiet tasks too
                print(f"warning: checkpoint.async: {why}; saving synchronously (the loop pauses for each write). "
                      f"Set checkpoint.async=false to silence this.", file=sys.stderr, flush=True)
            return None
        saver = cls(engine, world, device, timeout_s)
        mine = [i for i in infos if i[0] == infos[0][0]]
        free = f" of {mine[0][2] / 2**30:.1f} GiB available" if mine[0][2] is not None else ""
        say(f"checkpoint.async: checkpoints are written in the background; the snapshot holds {need / 2**30:.2f} GiB "
            f"of host memory on rank 0 ({sum(i[1] for i in mine) / 2**30:.2f} GiB on its node{free})")
        return saver

    # ---------------------------------------------------------------- the loop's side
    def warm(self, engine) -> None:
        """Allocate (and pin) the snapshot's host buffers once, for every save: a copy of the module's and the
        optimizer's state (after the first step: torch creates Adam's moments there), so no save pays for it."""
        self.stage(engine.module_state_dict())
        if engine.optimizer is not None:
            self.stage(engine.optimizer.state_dict())
        self._sync()

    def stage(self, state_dict):
        if self.stream is None:
            return self.stager.stage(state_dict)
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            copy_ = self.stager.stage(state_dict, non_blocking=True)
        self._held.append(state_dict)
        return copy_

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self._held.clear()

    def snapshot(self, engine, root, tag_dir, step, client_state, meta, keep_last, stats) -> None:
        """Collective (DeepSpeed's save_checkpoint, every file copied to host memory), then the background write."""
        files, errors = [], []

        def stage(state_dict, path):
            try:
                files.append((path, self.stage(state_dict)))
            except (RuntimeError, MemoryError) as e:
                errors.append(f"{path}: could not copy the state to host memory for the background write ({e}); "
                              f"set checkpoint.async=false")
        with ds_compat.checkpoint_writes_through(engine, stage):
            engine.save_checkpoint(root, tag=os.path.basename(tag_dir), client_state=client_state, save_latest=False)
        self._sync()
        _raise_if_failed(errors, root, tag_dir)
        self.root, self.tag_dir, self.failure = root, tag_dir, None
        self.thread = threading.Thread(target=self._write, name=f"mff-ckpt-{step}", daemon=True,
                                       args=(files, step, meta, keep_last, stats if stats is not None else {}))
        self.thread.start()

    def wait(self, before: str) -> float:
        """Join the save in flight (bounded: its collectives time out after timeout_s); said when it takes long.
        Raises its failure as CheckpointError (on every rank: the background threads agreed on it). -> s waited."""
        t = time.perf_counter()
        if self.thread is not None:
            self.thread.join(WAIT_SAY_S)
            if self.thread.is_alive():
                if self.rank == 0:
                    print(f"waiting for the background write of checkpoint {self.tag_dir} to finish before {before} "
                          f"({WAIT_SAY_S:.0f} s so far)", file=sys.stderr, flush=True)
                self.thread.join(self.timeout_s + 60)
            if self.thread.is_alive():  # its collectives time out before this: a stuck filesystem
                self.failure = self.failure or _failure(
                    [f"its background write did not finish within {self.timeout_s + 60 + WAIT_SAY_S:.0f} s"],
                    self.root, self.tag_dir)
            else:
                self.thread = None
        if self.failure:
            failure, self.failure = self.failure, None
            raise CheckpointError(failure)
        return time.perf_counter() - t

    @property
    def failed(self) -> bool:
        """The save in flight has failed (its thread ended with an error)."""
        return self.failure is not None and (self.thread is None or not self.thread.is_alive())

    def close(self) -> None:
        """At the end of a run that raised: let a save in flight complete (bounded), saying so if it failed."""
        try:
            self.wait("exiting")
        except CheckpointError as e:
            if self.rank == 0:
                print(f"warning: {e}", file=sys.stderr, flush=True)

    def take_done(self) -> list:
        out, self.done = self.done, []
        return out

    # ---------------------------------------------------------------- the background thread
    def _write(self, files: list, step: int, meta: dict, keep_last: int, stats: dict) -> None:
        """Write and fsync this rank's files, then complete the save as the synchronous path does: every rank's
        outcome gathered, rank 0 writes the marker and `latest` and prunes, and every rank learns the result."""
        t, cpu, root, tag_dir = time.perf_counter(), time.thread_time(), self.root, self.tag_dir
        errors, written = [], {}
        try:  # Linux: a thread is a task of its own; a busy node then gives its cores to the loop first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):
            pass
        try:
            for i, (path, state_dict) in enumerate(files):
                try:
                    written[os.path.relpath(path, tag_dir)] = write_file(state_dict, path, self.zipfile)
                except (OSError, RuntimeError) as e:
                    errors.append(_write_error(path, e))
                files[i] = None  # the snapshot's tree; its host buffers stay with the stager for the next save
            if not errors:
                _fsync_dirs([os.path.join(tag_dir, n) for n in written] or [tag_dir])
            errors = [e for part in _gather(errors, self.group) for e in part]
            if not errors:
                found = file_digests(tag_dir, written, self.group)
                err = _complete(root, tag_dir, step, meta, found, keep_last) if self.rank == 0 else None
                errors = [e for e in _gather(err, self.group)[:1] if e]
                stats.update(bytes=sum(size for size, _ in found.values()))
        except Exception as e:  # a collective that timed out (another rank died), an unreadable file: one line
            errors = errors or [f"{type(e).__name__}: {e}"]
        if errors:
            self.failure = _failure(errors, root, tag_dir)
            return
        stats.update(write_s=time.perf_counter() - t, write_cpu_s=time.thread_time() - cpu)  # the thread's CPU time
        self.done.append(stats)


def find(output_dir: str, resume: str) -> Optional[Tuple[str, str, dict]]:
    """Resolve --resume: 'none' -> None; 'auto' -> the newest complete, intact checkpoint under output_dir
    (or None); PATH -> a checkpoint tag dir, or a checkpoints root (its newest intact one). Collective (checksums
    are verified in parallel). Returns (root, tag, meta); CheckpointError when none is intact."""
    if resume == "none":
        return None
    if resume == "auto":
        root = os.path.join(output_dir, "checkpoints")
        if not os.path.isdir(root):
            return None
    else:
        path = os.path.abspath(resume)
        if not os.path.isdir(path):
            raise CheckpointError(f"--resume: expected 'auto', 'none', 'fresh' or a checkpoint directory, "
                                    f"got {resume!r}")
        if os.path.isfile(os.path.join(path, MARKER)):
            meta, reason = verified_meta(path)
            if reason:
                raise CheckpointError(f"--resume {resume}: checkpoint {path} is damaged: {reason}")
            return os.path.dirname(path), os.path.basename(path), migrate(meta, path)
        if os.path.isdir(os.path.join(path, "zero")):  # a ds_to_universal output
            meta = migrate(_meta_from_states(path), path)
            return os.path.dirname(path), os.path.basename(path), dict(meta, universal=True)
        root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    tags = complete_tags(root)
    if not tags:
        if resume != "auto":
            raise CheckpointError(f"--resume: no complete checkpoint (with {MARKER}) under {root}")
        return None
    failures = []
    for _, tag in reversed(tags):  # newest first
        meta, reason = verified_meta(os.path.join(root, tag))
        if meta is not None:
            _name_incomplete(root, tag)
            return root, tag, migrate(meta, os.path.join(root, tag))
        failures.append(f"{tag}: {reason}")
        if _rank_world()[0] == 0:
            print(f"warning: checkpoint {os.path.join(root, tag)} is damaged, not resuming from it: {reason}; "
                  f"trying the next older complete one", file=sys.stderr, flush=True)
    raise CheckpointError(f"no complete checkpoint under {root} is intact ({'; '.join(failures)}). Restore the "
                          f"files, or start afresh with --resume fresh (moves them aside).")


def _name_incomplete(root: str, tag: str) -> None:
    """Rank 0: a warning for each checkpoint newer than `tag` that has no marker (its save was cut short: a kill, a
    failed background write); it is never resumed from, and is overwritten or pruned by the saves to come."""
    step = int(TAG_RE.match(tag).group(1))
    if _rank_world()[0] != 0:
        return
    for name in sorted(os.listdir(root), key=lambda n: int(TAG_RE.match(n).group(1)) if TAG_RE.match(n) else -1):
        m = TAG_RE.match(name)
        if m and int(m.group(1)) > step and not os.path.isfile(os.path.join(root, name, MARKER)):
            print(f"warning: checkpoint {os.path.join(root, name)} is incomplete (no {MARKER}: its save did not "
                  f"finish); resuming from the newest complete one, {os.path.join(root, tag)}", file=sys.stderr,
                  flush=True)


def migrate(meta: dict, where: str) -> dict:
    """A completion marker of a format this version reads -> the current layout; anything else refused."""
    version = meta.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {where} has format {version}, newer than this mff-ds reads "
                              f"({FORMAT_VERSION}); upgrade mff-ds to resume it")
    if "compat" not in meta:
        raise CheckpointError(f"checkpoint {where} was written by an mff-ds older than checkpoint format 1 (its "
                              f"{MARKER} has no compat record) and cannot be resumed; start afresh with --resume "
                              f"fresh, or take its weights with `python -m mff_ds.convert`")
    if version == 1:  # a pretraining marker without the key was written unaligned; a fine-tune one (it names its
        # task) with the aligned default. Its client state is migrated in load().
        meta = dict(meta, parameter_alignment=meta.get("parameter_alignment", "task" in meta))
    if version <= 2:  # its lr followed neither reference exactly (engine.schedule.LEGACY); resuming it warns
        meta = copy.deepcopy(meta)
        for record in (meta["compat"], meta.get("recipe") or {}):
            if isinstance(record.get("schedule"), dict):
                record["schedule"].setdefault("reference", LEGACY)
    if version <= 3 and isinstance(meta["compat"].get("data"), dict):
        meta = copy.deepcopy(meta)
        keys = DATA_KEYS_BEFORE_4["eval" if "task" in meta["compat"] else "pretrain"]
        for k, v in keys.items():
            meta["compat"]["data"].setdefault(k, v)
    return dict(meta, format_version=FORMAT_VERSION)


def _meta_from_states(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    with weights_only_loads():
        sd = torch.load(path, map_location="cpu")
    return sd.get("mff_meta") or sd.get("client_state", {}).get("mff_meta", {})


def load(engine, root: str, tag: str) -> dict:
    """Collective: load module, optimizer and loss-scaler state; returns the client state."""
    with weights_only_loads():
        path, client = engine.load_checkpoint(root, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    client = client or {}
    if "task" not in client:  # format 1 fine-tune checkpoints kept the task's state at the top level
        client["task"] = dict(client)
    return client


def needs_universal(meta: dict, world_size: int, zero_stage: int) -> bool:
    """A checkpoint whose ZeRO partitions were cut for another world size (DeepSpeed cannot re-split them)."""
    saved = meta.get("world_size")
    return (saved not in (None, world_size) and not meta.get("universal")
            and max(zero_stage, meta.get("zero_stage", 0)) > 0)


def to_universal(root: str, tag: str, meta: dict) -> Tuple[str, str, dict]:
    """Collective. Rank 0 converts <root>/<tag> with DeepSpeed's ds_to_universal (in this process, so its loads are
    weights-only too) into the sibling <tag>_universal: written under a temporary name and renamed, so it exists only
    when complete, and later runs reuse it. Returns (root, universal tag, meta) for loading with load_universal."""
    import io
    src, dst = os.path.join(root, tag), os.path.join(root, f"{tag}_universal")
    err = None
    if _rank_world()[0] == 0 and not os.path.isdir(dst):
        tmp = f"{dst}.tmp{os.getpid()}"
        log = io.StringIO()
        try:
            with weights_only_loads(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_compat.ds_to_universal(src, tmp, workers=max(1, min(4, (os.cpu_count() or 1) // 2)))
            os.rename(tmp, dst)
            print(f"checkpoint {src} was saved by {meta.get('world_size')} rank(s); converted it for this world size "
                  f"to {dst} (DeepSpeed universal checkpoint)", flush=True)
        except Exception as e:  # any failure of the conversion: reported in one line, on every rank
            shutil.rmtree(tmp, ignore_errors=True)
            err = (f"could not convert {src} (saved by {meta.get('world_size')} ranks) to a universal checkpoint for "
                   f"this world size: {type(e).__name__}: {e}; resume with {meta.get('world_size')} ranks instead")
    err = all_gather_object(err)[0]
    if err:
        raise CheckpointError(err)
    return root, os.path.basename(dst), dict(meta, universal=True)


def universal_command(root: str, tag: str) -> str:
    src = os.path.join(root, tag)
    return (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {src} --output_folder {src}_universal"
            f"  # then: --resume {src}_universal --set deepspeed.load_universal=true")


# ------------------------------------------------------------------ consolidated weights
def fp32_state_dict(engine, root: str, tag: str) -> dict:
    """Consolidated fp32 weights of the checkpoint (ZeRO partitions merged), on CPU."""
    stage = engine.zero_optimization_stage()
    if stage > 0 or engine.bfloat16_enabled():
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with weights_only_loads():
                sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
            sd = {k: v.float().contiguous() for k, v in sd.items()}
            # DeepSpeed records frozen parameters (fixed position tables) in ZeRO-2/3 checkpoints only; frozen, the
            # module's own are the checkpoint's
            for k, v in engine.module.state_dict().items():
                sd.setdefault(k, v.detach().float().cpu().clone())
            return sd
        except Exception:  # ZeRO-0 + 16-bit: fall back to the module weights below
            if stage > 0:
                raise
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
