"""Checkpoints: DeepSpeed save/load with client state, a completion marker, an atomic `latest`, keep-last-K,
and the end-of-run exports (consolidated fp32 model, timm encoder).

DeepSpeed's own `latest` file is written by rank 0 with a plain open('w') before the other ranks finish their
ZeRO shards, so a kill can leave it pointing at a half-written checkpoint. We save with save_latest=False;
after every rank has returned, rank 0 writes `<tag>/mff_complete.json` and then replaces `latest`
atomically. Only tags with the marker are ever resumed from.
"""
import json
import os
import random
import re
import shutil
import time
from typing import List, Optional, Tuple

import numpy as np
import torch

from .distributed import barrier
from .safe_load import CheckpointError, weights_only_loads  # noqa: F401 (CheckpointError: re-exported)

MARKER = "mff_complete.json"
TAG_RE = re.compile(r"^global_step(\d+)$")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save(engine, root: str, step: int, client_state: dict, meta: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    tag = f"global_step{step}"
    tag_dir = os.path.join(root, tag)
    if engine.global_rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(os.path.join(tag_dir, MARKER)):
            os.remove(os.path.join(tag_dir, MARKER))  # overwriting: incomplete until saved again
    barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's files are on disk
    if engine.global_rank == 0:
        _atomic_write(os.path.join(tag_dir, MARKER), json.dumps(dict(meta, step=step, time=time.time()), indent=1))
        _atomic_write(os.path.join(root, "latest"), tag)
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
    """Resolve --resume: 'none' -> None; 'auto' -> the latest complete checkpoint under output_dir (or None);
    PATH -> a checkpoint tag dir, or a checkpoints root (its latest complete one). Returns (root, tag, meta)."""
    if resume == "none":
        return None
    if resume == "auto":
        root = os.path.join(output_dir, "checkpoints")
        if not os.path.isdir(root):
            return None
    else:
        path = os.path.abspath(resume)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--resume: expected 'auto', 'none' or a checkpoint directory, got {resume!r}")
        if os.path.isfile(os.path.join(path, MARKER)):
            return os.path.dirname(path), os.path.basename(path), read_meta(path)
        if os.path.isdir(os.path.join(path, "zero")):  # a ds_to_universal output
            meta = _meta_from_states(path)
            return os.path.dirname(path), os.path.basename(path), dict(meta, universal=True)
        root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    tags = complete_tags(root)
    if not tags:
        if resume != "auto":
            raise FileNotFoundError(f"--resume: no complete checkpoint (with {MARKER}) under {root}")
        return None
    latest_file = os.path.join(root, "latest")
    tag = tags[-1][1]
    if os.path.isfile(latest_file):
        named = open(latest_file).read().strip()
        if os.path.isfile(os.path.join(root, named, MARKER)):
            tag = named
    return root, tag, read_meta(os.path.join(root, tag))


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
    return client or {}


def universal_info() -> dict:
    """The client-state entry DeepSpeed's ds_to_universal requires (plain data parallel: just the version)."""
    try:
        from deepspeed.checkpoint import constants as c
        return {c.UNIVERSAL_CHECKPOINT_INFO: {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    except (ImportError, AttributeError):
        return {}


def universal_command(root: str, tag: str) -> str:
    src = os.path.join(root, tag)
    return (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {src} --output_folder {src}_universal"
            f"  # then: --resume {src}_universal --set deepspeed.load_universal=true")


# ------------------------------------------------------------------ exports
def fp32_state_dict(engine, root: str, tag: str) -> dict:
    """Consolidated fp32 weights of the checkpoint (ZeRO partitions merged), on CPU."""
    stage = engine.zero_optimization_stage()
    if stage > 0 or engine.bfloat16_enabled():
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with weights_only_loads():
                sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
            return {k: v.float().contiguous() for k, v in sd.items()}
        except Exception:  # ZeRO-0 + 16-bit: fall back to the module weights below
            if stage > 0:
                raise
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def export(engine, root: str, tag: str, out_dir: str, meta: dict) -> List[str]:
    """Rank 0: model_fp32.safetensors (our model file: `mff_ds.convert.load_model` reads it) and
    encoder_timm.safetensors (strict-loads into the matching timm ViT)."""
    from mff_ds.convert import FORMAT, save_file, to_timm
    sd = fp32_state_dict(engine, root, tag)
    cfg = engine.module.cfg.to_dict()
    model_path = os.path.join(out_dir, "model_fp32.safetensors")
    save_file(sd, model_path, {**meta, "format": FORMAT, "model_config": cfg})
    timm_path = os.path.join(out_dir, "encoder_timm.safetensors")
    save_file(to_timm(sd), timm_path, {**meta, "model_config": cfg})
    return [model_path, timm_path]
