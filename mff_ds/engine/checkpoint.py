"""Checkpoints: DeepSpeed save/load with client state, a completion marker, an atomic `latest`, keep-last-K,
and the consolidated fp32 weights of a checkpoint (what a task exports at the end).

DeepSpeed's own `latest` file is written by rank 0 with a plain open('w') before the other ranks finish their
ZeRO shards, so a kill can leave it pointing at a half-written checkpoint. We save with save_latest=False;
after every rank has returned, rank 0 writes `<tag>/mff_complete.json` and then replaces `latest`
atomically. Only tags with the marker are ever resumed from.

The marker lists every file of the checkpoint with its size and SHA-256 (hashed in parallel, each rank a share of
the files). On resume the newest complete checkpoint whose files all match is used; a damaged one (truncated,
emptied, changed, unreadable marker) is reported with its reason and the next older one is tried.
A failed write (disk full, no permission) is caught on every rank, so no rank waits in a barrier for one that
failed, and reported with the path and the previous complete checkpoint, which is left intact.
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
import time
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
FORMAT_VERSION = 3
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


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shared(names: list, work) -> dict:
    """Collective: {name: work(name)}, each rank doing every world-th name."""
    rank, world = _rank_world()
    out = {}
    for part in all_gather_object({n: work(n) for n in names[rank::world]}):
        out.update(part)
    return out


def file_digests(tag_dir: str) -> dict:
    """Collective: {relative path: [size, sha256]} of every file under tag_dir except the marker."""
    names = sorted(os.path.relpath(os.path.join(d, f), tag_dir) for d, _, fs in os.walk(tag_dir) for f in fs
                   if f != MARKER)
    names = all_gather_object(names)[0]  # rank 0's listing: another node's directory cache may lag
    return _shared(names, lambda n: [os.path.getsize(os.path.join(tag_dir, n)), _sha256(os.path.join(tag_dir, n))])


def verified_meta(tag_dir: str) -> Tuple[Optional[dict], Optional[str]]:
    """Collective: (marker, None) when every file the marker lists has its size and checksum, else (None, reason).
    A marker without a file list (written before checksums were recorded) is accepted as it is."""
    try:
        meta = read_meta(tag_dir)
        files = meta.get("files", {})
        if not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
            raise ValueError("its file list is malformed")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"its {MARKER} is unreadable ({e})"

    def check(name):
        path = os.path.join(tag_dir, name)
        size, digest = files[name]
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, expected {size}"
        return None if _sha256(path) == digest else f"{name} has another SHA-256 than when it was written"

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


def _recording_writer(engine, errors: list):
    """DeepSpeed writes every file and then meets the other ranks in a barrier: an exception on one rank would leave
    the others waiting there until the collective timeout. This writer records the error instead (the caller gathers
    them), and writes through a Python file object, which keeps the errno (ENOSPC, EACCES) that torch's own writer
    turns into 'unexpected pos'."""
    def save(state_dict, path):
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=ds_compat.zipfile_serialization(engine))
        except (OSError, RuntimeError) as e:
            errors.append(_write_error(path, e))
    return ds_compat.checkpoint_writes_through(engine, save)


def _raise_if_failed(errors: list, root: str, tag_dir: str) -> None:
    """Collective: every rank raises the same CheckpointError when any rank failed."""
    errors = [e for part in all_gather_object(errors) for e in part]
    if errors:
        prev = [t for _, t in complete_tags(root) if os.path.join(root, t) != tag_dir]
        keep = (f"the previous complete checkpoint {os.path.join(root, prev[-1])} is intact; free space or fix "
                f"permissions, then rerun with --resume auto" if prev else "there is no earlier complete checkpoint")
        raise CheckpointError(f"could not write checkpoint {tag_dir}: {errors[0]}"
                              f"{f' (and {len(errors) - 1} more)' if len(errors) > 1 else ''}; {keep}.")


def save(engine, root: str, step: int, client_state: dict, meta: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    tag = f"global_step{step}"
    tag_dir = os.path.join(root, tag)
    errors = []
    if engine.global_rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(os.path.join(tag_dir, MARKER)):
                os.remove(os.path.join(tag_dir, MARKER))  # overwriting: incomplete until saved again
        except OSError as e:
            errors.append(_write_error(root, e))
    _raise_if_failed(errors, root, tag_dir)
    with _recording_writer(engine, errors):
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    _raise_if_failed(errors, root, tag_dir)  # every rank's files are on disk, or every rank raises
    files = file_digests(tag_dir)
    if engine.global_rank == 0:
        try:
            write_json(os.path.join(tag_dir, MARKER), dict(meta, step=step, time=time.time(), files=files),
                       indent=1, fsync=True)
            write_text(os.path.join(root, "latest"), tag, fsync=True)
        except OSError as e:
            errors.append(_write_error(os.path.join(tag_dir, MARKER), e))
    _raise_if_failed(errors, root, tag_dir)
    if engine.global_rank == 0:
        for _, old in complete_tags(root)[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        # half-written tags older than the newest complete one are garbage too
        newest = complete_tags(root)[-1][0]
        for name in os.listdir(root):
            m = TAG_RE.match(name)
            if m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(root, name, MARKER)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    barrier()
    return tag_dir


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
            return root, tag, migrate(meta, os.path.join(root, tag))
        failures.append(f"{tag}: {reason}")
        if _rank_world()[0] == 0:
            print(f"warning: checkpoint {os.path.join(root, tag)} is damaged, not resuming from it: {reason}; "
                  f"trying the next older complete one", file=sys.stderr, flush=True)
    raise CheckpointError(f"no complete checkpoint under {root} is intact ({'; '.join(failures)}). Restore the "
                          f"files, or start afresh with --resume fresh (moves them aside).")


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
