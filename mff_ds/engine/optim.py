"""Optimizer, learning-rate schedule and the DeepSpeed engine.

- `lr_at(step, ...)`: mmengine's LinearLR warmup (from `start_factor`) then half-cosine to `min_lr`,
  evaluated from the optimizer-step index, so fp16 overflow skips never shift the schedule.
- `build_ds_config(...)`: ds_configs JSON + precision JSON + batch/clipping from the recipe + overrides.
- `build_optimizer(...)`: DeepSpeed FusedAdam (AdamW mode) on CUDA (torch fused AdamW if the op cannot be
  built), torch.optim.AdamW on CPU.
- `build_deepspeed_engine(model, param_groups, ds_config, ...)`: reusable by pretraining and downstream tasks.
"""
import copy
import json
import math
import os
import warnings
from typing import List, Optional, Sequence

import torch

from .recipe import Recipe, RecipeError, _deep_update, resolve_path

PRECISION_FILES = {"fp32": "ds_configs/fp32.json", "bf16": "ds_configs/bf16.json", "fp16": "ds_configs/fp16.json"}


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0,
          start_factor: float = 1e-4) -> float:
    """lr for optimizer step `step` (0-based): linear warmup from peak*start_factor, then cosine to min_lr."""
    if step < warmup_steps:
        return peak_lr * (start_factor + (1.0 - start_factor) * step / warmup_steps)
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span) / span
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def schedule_steps(recipe, batches_per_epoch: int, accum: int, max_steps=None):
    """(steps_per_epoch, total_steps, warmup_steps, stop_step) for `batches_per_epoch` micro-batches per rank."""
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise RecipeError([f"batch.global_batch: one epoch gives {batches_per_epoch} micro-batches per rank, fewer "
                           f"than the {accum} needed for one optimizer step; expected a larger dataset or a smaller "
                           f"batch"])
    total_steps = recipe.schedule.epochs * steps_per_epoch
    warmup_steps = int(round(recipe.schedule.warmup_epochs * steps_per_epoch))
    stop_step = min(total_steps, max_steps) if max_steps else total_steps
    return steps_per_epoch, total_steps, warmup_steps, stop_step


def set_lr(optimizer, lr: float) -> None:
    """Set every param group's lr (times its optional `lr_scale`, e.g. layer decay in fine-tuning)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _read_json(path: str) -> dict:
    with open(resolve_path(path)) as f:
        return json.load(f)


def build_ds_config(recipe: Recipe, world_size: int, device: torch.device) -> dict:
    """The merged DeepSpeed config for this recipe, world size and device."""
    precision = resolve_precision(recipe.precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise RecipeError([f"precision: fp16 needs a CUDA device (dynamic loss scaling); on {device.type} use "
                           f"bf16 or fp32 (auto picks fp32), got fp16"])
    cfg = _read_json(recipe.deepspeed.config)
    _deep_update(cfg, _read_json(PRECISION_FILES[precision]))
    for other in ("fp16", "bf16"):
        if other != precision:
            cfg[other] = {"enabled": False}
    if recipe.deepspeed.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = recipe.deepspeed.zero_stage
    if recipe.deepspeed.load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    _deep_update(cfg, recipe.deepspeed.overrides)
    cfg.update(train_batch_size=recipe.batch.global_batch,
               train_micro_batch_size_per_gpu=recipe.batch.micro_batch,
               gradient_accumulation_steps=recipe.grad_accum(world_size),
               gradient_clipping=recipe.optim.grad_clip)
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def precision_of(ds_config: dict) -> str:
    for p in ("bf16", "fp16"):
        if ds_config.get(p, {}).get("enabled"):
            return p
    return "fp32"


def build_optimizer(param_groups: List[dict], lr: float, betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8,
                    device: Optional[torch.device] = None):
    """AdamW: DeepSpeed FusedAdam (adam_w_mode) on CUDA, torch.optim.AdamW on CPU. Groups carry weight_decay."""
    groups = [dict(g) for g in param_groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    device = device or next(p.device for g in groups for p in g["params"])
    if device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adam_w_mode=True, weight_decay=0.0)
        except Exception as e:  # the op is JIT-built with nvcc; a machine without a working toolchain falls back
            warnings.warn(f"DeepSpeed FusedAdam unavailable ({type(e).__name__}: {e}); using torch.optim.AdamW(fused=True)")
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0)


def build_deepspeed_engine(model: torch.nn.Module, param_groups: List[dict], ds_config: dict, *, lr: float,
                           betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8,
                           device: Optional[torch.device] = None):
    """Move `model` to `device`, build AdamW over `param_groups` and wrap both in a DeepSpeed engine.

    The learning rate is then driven by the caller with `set_lr(engine_optimizer, ...)` each optimizer step
    (no DeepSpeed scheduler). Returns (engine, base_optimizer)."""
    import deepspeed

    from .distributed import device_for
    device = device or device_for(int(os.environ.get("LOCAL_RANK", 0)))
    model.to(device)
    optimizer = build_optimizer(param_groups, lr, betas, eps, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(ds_config))
    return engine, optimizer
