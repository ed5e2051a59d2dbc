"""Every use of DeepSpeed internals (private attributes and modules, not its documented API), in one place.

Each was read from DeepSpeed TESTED_RANGE. `check_version()` runs at start-up: outside that range it prints one line
naming the installed and the tested versions, and the patches below are switched off (DeepSpeed then runs as it
ships: a little slower, and a failed checkpoint write on one rank raises there instead of on every rank) rather
than applied to code they were not read from. pyproject.toml bounds deepspeed to the same range.
"""
import contextlib
import sys
from typing import Callable

import torch

TESTED_RANGE = ("0.19.8", "0.20")  # [first tested, first untested): 0.19.8 is what CI and the GPU suite run
_state = {"checked": False, "on": True}


def version_tuple(v: str) -> tuple:
    """'2.14.1+cu130' -> (2, 14, 1); '2.8.0a0' -> (2, 8, 0)."""
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in v.split("+")[0].split(".")[:3])


def installed() -> str:
    import deepspeed
    return deepspeed.__version__


def in_tested_range(version: str) -> bool:
    lo, hi = (version_tuple(v) for v in TESTED_RANGE)
    return lo <= version_tuple(version) < hi


def check_version(is_main: bool = True) -> bool:
    """Once per process: True when the installed DeepSpeed is in TESTED_RANGE; else one line (rank 0) and the
    patches are off."""
    if not _state["checked"]:
        _state["checked"], _state["on"] = True, in_tested_range(installed())
        if not _state["on"] and is_main:
            print(f"warning: DeepSpeed {installed()} is outside the range mff-ds was tested with "
                  f"(>={TESTED_RANGE[0]},<{TESTED_RANGE[1]}); its internal patches are off (the per-step view-refresh "
                  f"skip, per-rank checkpoint write errors). Install deepspeed=={TESTED_RANGE[0]} for the tested "
                  f"behaviour.", file=sys.stderr, flush=True)
    return _state["on"]


def skip_view_refresh_while_intact(zero_optimizer) -> bool:
    """DeepSpeed's ZeRO-1/2 step() ends by re-pointing every parameter at its slice of the flat 16-bit buffer
    (`_update_model_bit16_weights`, "TODO: we probably don't need this?" upstream): an unflatten and a .data
    assignment per parameter, every step, though the all-gather already wrote the new weights into those very
    slices. Skip it while each group's buffer and its first and last parameters are where they were; whenever
    DeepSpeed replaces a buffer (checkpoint load, offload/reload) the original runs and the layout is re-read.
    Returns whether the patch is in place (False for ZeRO-0 / BF16_Optimizer: no per-step refresh to skip)."""
    original = getattr(zero_optimizer, "_update_model_bit16_weights", None)
    flats, groups = getattr(zero_optimizer, "bit16_groups_flat", None), getattr(zero_optimizer, "bit16_groups", None)
    if original is None or flats is None or groups is None or not check_version():
        return False

    def layout(i):
        return flats[i].data_ptr(), groups[i][0].data_ptr(), groups[i][-1].data_ptr()
    seen = {i: layout(i) for i in range(len(groups))}

    def refresh(i):
        if seen.get(i) != layout(i):
            original(i)
            seen[i] = layout(i)
    zero_optimizer._update_model_bit16_weights = refresh
    return True


def skip_single_rank_reduce(zero_optimizer) -> bool:
    """ZeRO-1 without hooks on one rank: DeepSpeed's reduce_gradients() still walks every parameter at the step's
    end, copies its gradient into a bucket, all-reduces it over the one rank (divides by 1) and copies it back, before
    the epilogue that builds the optimizer's flat gradient partition. Run the epilogue alone there: the same values,
    without per-parameter host work. Returns whether the patch is in place."""
    import torch.distributed as dist
    # with hooks, fp32 gradient accumulation or CPU offload the reduce does more than copy over one rank
    busy = any(getattr(zero_optimizer, k, True) for k in ("partition_gradients", "overlap_comm", "contiguous_gradients",
                                                           "use_grad_accum_attribute", "cpu_offload"))
    if (type(zero_optimizer).__name__ != "DeepSpeedZeroOptimizer" or busy
            or dist.get_world_size(group=zero_optimizer.dp_process_group) != 1 or not check_version()):
        return False
    zero_optimizer.reduce_gradients = lambda pipeline_parallel=False: \
        zero_optimizer.independent_gradient_partition_epilogue()
    return True


def restore_view_refresh(zero_optimizer) -> None:
    """DeepSpeed's own per-step refresh and reduce again (the benchmarks' "stock DeepSpeed" trainer, the tests)."""
    zero_optimizer.__dict__.pop("_update_model_bit16_weights", None)
    zero_optimizer.__dict__.pop("reduce_gradients", None)


def loss_scale(engine) -> float:
    """The current loss scale of the engine's optimizer wrapper (1.0 where there is none)."""
    for name in ("cur_scale", "loss_scale"):
        v = getattr(engine.optimizer, name, None)
        if isinstance(v, (int, float, torch.Tensor)):
            return float(v)
    return 1.0


# torch.amp.GradScaler's defaults, which mmpretrain's AmpOptimWrapper(loss_scale='dynamic') and official MAE's
# NativeScaler use: start at 2**16, halve on an overflow (and skip the step), double after 2000 clean steps
AMP_FP16_SCALER = {"init_scale": 2.0**16, "scale_window": 2000, "delayed_shift": 1, "consecutive_hysteresis": False}


def forget_autocast_of_earlier_engines() -> None:
    """DeepSpeed records "torch_autocast is on, in dtype D" in module globals when an engine is built with it, and
    every ZeRO optimizer built later in the process reads them (an fp16 one gives a bf16 engine a GradScaler).
    Clearing them before each engine is built makes each engine depend on its own config only (the benchmarks
    build several engines in one process)."""
    from deepspeed.runtime import torch_autocast
    if check_version():
        torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None


def amp_fp16_loss_scale(zero_optimizer) -> None:
    """amp-fp16 under ZeRO-1/2: DeepSpeed 0.19 gives the ZeRO optimizer a torch GradScaler of its own on each rank,
    which checks only that rank's gradient partition for inf/NaN (ranks can disagree on skipping a step and then
    on the scale, and the reduced gradients mix scales), is not in the checkpoint, and is not divided out of the
    norm used for clipping. Use DeepSpeed's DynamicLossScaler instead, with GradScaler's settings
    (AMP_FP16_SCALER): overflow is all-reduced over the ranks, the scale is checkpointed, clipping and the
    reported norm are unscaled. As with GradScaler, the scale grows after the optimizer step it was earned on
    (DeepSpeed grows it before unscaling, which would halve the gradients of that step)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from mff_ds.common import UserError
    if not hasattr(zero_optimizer, "torch_autocast_gradscaler") or not check_version():
        raise UserError(f"precision: amp-fp16 needs a ZeRO-1/2 optimizer of DeepSpeed {TESTED_RANGE[0]} to "
                        f"{TESTED_RANGE[1]} (excluded), got {type(zero_optimizer).__name__} of DeepSpeed "
                        f"{installed()}; use amp-bf16 or fp16")
    opt = zero_optimizer
    if opt.__dict__.get("step") is not None:  # applied already (the wrapped step is an instance attribute)
        return
    opt.torch_autocast_gradscaler = None
    opt.loss_scaler = DynamicLossScaler(min_scale=1.0, raise_error_at_min_scale=False, dtype=torch.float16,
                                        **AMP_FP16_SCALER)
    opt.dynamic_loss_scale = opt.check_grad_overflow = True
    step = opt.step

    def shrink_only(has_overflow=False):  # step() calls it before unscaling: only an overflow acts now
        if has_overflow:
            opt.loss_scaler.update_scale(True)

    def step_then_grow(*args, **kwargs):
        out = step(*args, **kwargs)
        if not opt.overflow:
            opt.loss_scaler.update_scale(False)  # counts the clean step; doubles the scale after scale_window
        return out
    opt._update_scale, opt.step = shrink_only, step_then_grow


def gradient_hooks(zero_optimizer) -> int:
    """How many per-parameter gradient hooks DeepSpeed's ZeRO-1/2 optimizer installed (0 for other optimizers)."""
    return len(getattr(zero_optimizer, "_grad_acc_hooks", ()))


def zero_grad_norm(zero_optimizer):
    """ZeRO-1/2: the global L2 norm of the reduced, unscaled gradient partitions (DeepSpeed's own routine); None
    for other optimizers."""
    if not hasattr(zero_optimizer, "scaled_global_norm"):
        return None
    return zero_optimizer.scaled_global_norm() / zero_optimizer.loss_scale


@contextlib.contextmanager
def checkpoint_writes_through(engine, save: Callable[[dict, str], None]):
    """Within the block, DeepSpeed's TorchCheckpointEngine writes every checkpoint file with `save(state_dict,
    path)`. Another checkpoint engine (or an untested DeepSpeed) writes its own way."""
    ce = engine.checkpoint_engine
    if not can_write_through(engine):
        yield
        return
    ce.save = save
    try:
        yield
    finally:
        del ce.save


def can_write_through(engine) -> bool:
    """checkpoint_writes_through() redirects this engine's writes (what asynchronous saves need)."""
    return type(engine.checkpoint_engine).__name__ == "TorchCheckpointEngine" and check_version()


def zipfile_serialization(engine) -> bool:
    return getattr(engine.checkpoint_engine, "zipfile_serialization", True)


def checkpoint_classes() -> list:
    """The DeepSpeed classes its checkpoints pickle (ZeRO 0-3, fp32/bf16/fp16, universal), for weights-only loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def universal_info() -> dict:
    """The client-state entry DeepSpeed's ds_to_universal requires (plain data parallel: just the version)."""
    try:
        from deepspeed.checkpoint import constants as c
        return {c.UNIVERSAL_CHECKPOINT_INFO: {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    except (ImportError, AttributeError):
        return {}


def ds_to_universal(src: str, dst: str, workers: int) -> None:
    """DeepSpeed's ds_to_universal command, in this process (so its loads run under our weights-only patch)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal as tool
    tool.main(argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=workers,
                                 num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                                 inject_missing_state=False))
