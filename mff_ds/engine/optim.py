"""Optimizer, learning-rate schedule and the DeepSpeed engine.

- `schedule_steps(...)`: the recipe's lr schedule (engine.schedule: its reference's, per step and param group) for
  the loader's epoch length, evaluated from the optimizer-step index, so fp16 overflow skips never shift it.
- `build_ds_config(...)`: ds_configs JSON + precision JSON (fp32, bf16, fp16, amp-bf16, amp-fp16) + batch/clipping
  from the recipe + the engine-speed defaults of `engine_defaults` (each only where the JSON and the recipe's
  overrides leave the key unset).
- `build_optimizer(...)`: torch.optim.AdamW(fused=True) on every device (see its docstring for why).
- `build_deepspeed_engine(model, param_groups, ds_config, ...)`: reusable by pretraining and downstream tasks.
"""
import copy
import json
import os
from typing import List, Optional, Sequence, Tuple

import torch

from . import ds_compat
from .recipe import RecipeError, _deep_update, resolve_path
from .schedule import LrSchedule, lr_schedule

PRECISION_FILES = {p: f"ds_configs/{p}.json" for p in ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")}
# DeepSpeed's three mixed-precision sections; a precision's JSON enables at most one, the others are switched off
PRECISION_SECTIONS = ("fp16", "bf16", "torch_autocast")


def schedule_steps(recipe, batches_per_epoch: int, max_steps=None) -> Tuple[LrSchedule, int]:
    """(the lr schedule, stop_step) for `batches_per_epoch` micro-batches per rank, in optimizer steps of the
    recipe's batch plan."""
    accum = recipe.plan.accum
    if batches_per_epoch // accum < 1:
        raise RecipeError([f"batch.global_batch: one epoch gives {batches_per_epoch} micro-batches per rank, fewer "
                           f"than the {accum} needed for one optimizer step; expected a larger dataset or a smaller "
                           f"batch"])
    schedule = lr_schedule(recipe, batches_per_epoch, accum)
    total = schedule.total_steps
    return schedule, min(total, max_steps) if max_steps else total


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _read_json(path: str) -> dict:
    with open(resolve_path(path)) as f:
        return json.load(f)


# Below this many elements per rank a ZeRO-2 gradient bucket is too small to overlap anything useful; above it
# the bucket delays the first reduce-scatter. 5e7 elements (100 MB in bf16) gives ViT-B 3 buckets and ViT-L 7:
# all but the last reduce while backward still runs (overlap_comm), on 8 to 64 ranks alike.
MULTI_RANK_BUCKET = 50_000_000


def engine_defaults(zero_stage: int, world_size: int, grad_clip: float) -> dict:
    """The DeepSpeed settings that decide host work per step, as measured by
    `benchmarks/throughput.py --device cpu --preset overhead` (docs in docs/ENGINE.md "Engine settings"):

    - parameter_alignment: every weight starts on a 16-byte boundary of ZeRO's flat buffers (without it one
      odd-sized tensor, MFF's 6 fusion logits, shifted 88 weights off alignment and onto slower GEMM kernels).
    - compute_grad_norm (ZeRO-2, no clipping): DeepSpeed would take the global norm on every step only to report
      it; the trainer takes it on logging steps instead (`grad_norm`). With clipping it is needed every step.
    - ZeRO-2, one rank: no overlap_comm (it adds a device synchronize after every backward and has nothing to
      overlap), no contiguous_gradients (a copy kernel and Python bookkeeping per parameter; the single bucket is
      flattened once instead), one bucket for the whole model.
    - ZeRO-2, several ranks: overlap_comm with contiguous double-buffered buckets of MULTI_RANK_BUCKET elements, so
      the reduce-scatter of each bucket runs during the rest of backward (at the price of a DeepSpeed hook on
      every parameter, run after each micro-batch's backward).
    - ZeRO-1 (the ViT-S/B recipes' path): no overlap_comm and no contiguous_gradients on any world size, so DeepSpeed
      installs no gradient hook at all; the gradients are reduced once per optimizer step, after the last backward,
      in buckets of MULTI_RANK_BUCKET elements (docs/ENGINE.md "Which path": benchmarks/ddp_overhead.py and
      benchmarks/scaling_model.py --paths measure and model the choice).
    - throughput timers off: DeepSpeed's own images/s timer synchronizes the device twice per step; the trainer
      measures images/s itself on logging steps.
    """
    zero = {"parameter_alignment": True}
    if zero_stage == 2:
        many = world_size > 1
        zero.update(compute_grad_norm=grad_clip > 0, overlap_comm=many, contiguous_gradients=many,
                    reduce_scatter=True, reduce_bucket_size=MULTI_RANK_BUCKET if many else 1_000_000_000,
                    allgather_bucket_size=500_000_000)
    elif zero_stage == 1:  # no gradient hooks: the gradients are reduced once, after the step's last backward
        zero.update(compute_grad_norm=grad_clip > 0, overlap_comm=False, contiguous_gradients=False,
                    reduce_scatter=True, reduce_bucket_size=MULTI_RANK_BUCKET, allgather_bucket_size=500_000_000)
    return {"zero_optimization": zero, "timers": {"throughput": {"enabled": False}}}


def _set_defaults(cfg: dict, defaults: dict) -> None:
    for k, v in defaults.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            _set_defaults(cfg[k], v)
        else:
            cfg.setdefault(k, v)


def build_ds_config(recipe, world_size: int, device: torch.device) -> dict:
    """The merged DeepSpeed config for this recipe, world size and device."""
    precision = resolve_precision(recipe.precision, device)
    cfg = _read_json(recipe.deepspeed.config)
    chosen = _read_json(PRECISION_FILES[precision])
    _deep_update(cfg, chosen)
    for section in PRECISION_SECTIONS:
        if not chosen.get(section, {}).get("enabled"):
            cfg[section] = {"enabled": False}
    if recipe.deepspeed.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = recipe.deepspeed.zero_stage
    if recipe.deepspeed.load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    if recipe.deepspeed.deepcompile:
        cfg["compile"] = dict(cfg.get("compile", {}), deepcompile=True)
    _deep_update(cfg, recipe.deepspeed.overrides)
    plan = recipe.plan
    if plan.world != world_size:
        raise RuntimeError(f"the recipe's batch plan is for {plan.world} rank(s), not {world_size}: "
                           f"check(recipe, {world_size}) first")
    cfg.update(train_batch_size=plan.global_batch, train_micro_batch_size_per_gpu=plan.micro,
               gradient_accumulation_steps=plan.accum, gradient_clipping=recipe.optim.grad_clip)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    _set_defaults(cfg, engine_defaults(stage, world_size, recipe.optim.grad_clip))
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    _check_fp16(precision, stage, device)
    _check_deepcompile(recipe.deepspeed.deepcompile, stage, device)
    return cfg


def _check_deepcompile(on: bool, stage: int, device: torch.device) -> None:
    """DeepCompile (DeepSpeed's compiler-driven ZeRO, no Python hooks) runs on CUDA only, for ZeRO-1 and 2 here."""
    if on and device.type != "cuda":
        raise RecipeError([f"deepspeed.deepcompile: DeepSpeed's DeepCompile runs on CUDA devices only; on "
                           f"{device.type} use deepspeed.deepcompile=false (ZeRO-1 without hooks: "
                           f"ds_configs/zero1.json), got true"])
    if on and stage not in (1, 2):
        raise RecipeError([f"deepspeed.deepcompile: compiles ZeRO-1 or ZeRO-2 here; expected deepspeed.zero_stage 1 "
                           f"or 2, got stage {stage}"])


def _check_fp16(precision: str, stage: int, device: torch.device) -> None:
    """fp16 needs a loss scale, kept on CUDA only here (CPU runs use fp32 or bf16). amp-fp16's dynamic loss scale is
    DeepSpeed's ZeRO-1/2 one (ds_compat.amp_fp16_loss_scale); ZeRO-0 would use an unsaved per-rank GradScaler."""
    if precision == "fp16" and device.type != "cuda":
        raise RecipeError([f"precision: fp16 needs a CUDA device (dynamic loss scaling); on {device.type} use "
                           f"bf16 or fp32 (auto picks fp32), got fp16"])
    if precision == "amp-fp16" and stage not in (1, 2):
        raise RecipeError([f"precision: amp-fp16 needs ZeRO stage 1 or 2 (its dynamic loss scale lives in the ZeRO "
                           f"optimizer); use deepspeed.zero_stage=2 or precision amp-bf16, got stage {stage}"])
    if precision == "amp-fp16" and device.type != "cuda":
        raise RecipeError([f"precision: amp-fp16 needs a CUDA device (fp16 autocast, dynamic loss scaling); on "
                           f"{device.type} use amp-bf16 or fp32, got amp-fp16"])


def precision_of(ds_config: dict) -> str:
    """The recipe's precision name for a merged DeepSpeed config (amp-<dtype> for a torch_autocast section)."""
    for p in ("bf16", "fp16"):
        if ds_config.get(p, {}).get("enabled"):
            return p
    amp = ds_config.get("torch_autocast", {})
    if amp.get("enabled"):
        return "amp-fp16" if str(amp.get("dtype")) in ("float16", "fp16", "half", "torch.float16") else "amp-bf16"
    return "fp32"


def build_optimizer(param_groups: List[dict], lr: float, betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8):
    """torch.optim.AdamW(fused=True), groups carrying their weight_decay, on CUDA and CPU alike.

    Under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) the optimizer sees one flat fp32 tensor per group, so torch's
    fused AdamW is one kernel per group, the same math as DeepSpeed's FusedAdam (adam_w_mode) without its JIT
    build (nvcc, ninja, and a TORCH_CUDA_ARCH_LIST it can parse). One choice everywhere keeps CPU tests and GPU
    runs on the same update code."""
    groups = [dict(g) for g in param_groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, fused=True)


def build_deepspeed_engine(model: torch.nn.Module, param_groups: List[dict], ds_config: dict, *, lr: float,
                           betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8,
                           device: Optional[torch.device] = None):
    """Move `model` to `device`, build AdamW over `param_groups` and wrap both in a DeepSpeed engine.

    The learning rate is then driven by the caller with `LrSchedule.apply(base_optimizer, step)` each optimizer step
    (no DeepSpeed scheduler). Returns (engine, base_optimizer)."""
    import deepspeed

    from .distributed import device_for
    device = device or device_for(int(os.environ.get("LOCAL_RANK", 0)))
    model.to(device)
    optimizer = build_optimizer(param_groups, lr, betas, eps)
    ds_compat.forget_autocast_of_earlier_engines()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(ds_config))
    ds_compat.skip_view_refresh_while_intact(engine.optimizer)
    ds_compat.skip_single_rank_reduce(engine.optimizer)
    if precision_of(ds_config) == "amp-fp16":
        ds_compat.amp_fp16_loss_scale(engine.optimizer)
    return engine, optimizer


def norm_is_ours(ds_config: dict, precision: str) -> bool:
    """True where DeepSpeed does not take the global grad norm itself, so the trainer takes it on logging steps
    (`grad_norm`): ZeRO-0 with fp32 weights (fp32, amp-*: no DeepSpeed optimizer wrapper) and ZeRO-1/2 with
    compute_grad_norm off."""
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    fp32_weights = precision in ("fp32", "amp-bf16", "amp-fp16")
    return (stage == 0 and fp32_weights) or (stage in (1, 2) and not zero.get("compute_grad_norm", True))


def grad_norm(engine) -> torch.Tensor:
    """The global L2 norm of this optimizer step's gradients (all ranks, unscaled), as a device tensor.

    Call it after the backward of the step's last micro-batch and before engine.step(), on the same steps on
    every rank (it is a collective under ZeRO-2). ZeRO-2 holds each rank's reduced partition of the gradients
    by then; DeepSpeed's own norm routine over them is used, as DeepSpeed would on every step."""
    norm = ds_compat.zero_grad_norm(engine.optimizer)
    if norm is not None:  # ZeRO-1/2
        return norm
    return torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
