"""The training loop on a DeepSpeed engine, generic over "a model whose forward returns an object with .loss".

uint8 batch -> device -> normalize -> model -> loss -> engine.backward / engine.step, with the lr set from the
optimizer-step index, periodic checkpoints with exact data/RNG position, metrics on logging steps only
(the only host synchronisation), reconstruction grids, NaN/Inf handling (stop or roll back) and final exports.
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mff_ds.common import DTYPES, seed_everything, write_json

from . import checkpoint as ckpt
from . import logging as mlog
from .distributed import DistEnv, device_for, init_distributed
from .optim import (build_deepspeed_engine, build_ds_config, grad_norm, lr_at, norm_is_ours, precision_of,
                    schedule_steps, set_lr)
from .recipe import Recipe, RecipeError, check, resume_differences, save_recipe
from .rundir import owns_output_dir
from .signals import StopOnSignal

NEVER = 2**62


class NonFiniteLossError(RuntimeError):
    pass


class IncompatibleCheckpointError(RuntimeError):
    pass


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _loss_scale(engine) -> float:
    for name in ("cur_scale", "loss_scale"):
        v = getattr(engine.optimizer, name, None)
        if isinstance(v, (int, float, torch.Tensor)):
            return float(v)
    return 1.0


def _flops_per_image(model) -> Optional[float]:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None
    try:
        from mff_ds.models.flops import flops_per_image
        return float(flops_per_image(cfg))
    except ImportError:
        return None


def default_forward(engine, images, labels):
    return engine(images)


@dataclass
class Position:
    """Where the run is: optimizer steps done, epoch, micro-batches of this epoch consumed on each rank."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    rollbacks: int = 0


def check_resume(meta: dict, recipe: Recipe, world_size: int, zero_stage: int, root: str, tag: str) -> bool:
    """Refuse incompatible checkpoints with a clear message; returns True when it is a universal checkpoint."""
    where = os.path.join(root, tag)
    incompatible, changed = resume_differences(meta, recipe)
    if incompatible:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was written by an incompatible recipe; differences:\n  " + "\n  ".join(incompatible) +
            "\nRevert these settings, or start afresh with --resume fresh (moves the old run aside) / another "
            "--output-dir.")
    universal = bool(meta.get("universal"))
    if meta.get("zero_stage") not in (None, zero_stage) and not universal:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was saved with ZeRO stage {meta['zero_stage']}, this run uses stage {zero_stage}; "
            f"DeepSpeed cannot load one stage's optimizer state into another. Set deepspeed.zero_stage="
            f"{meta['zero_stage']} (or the same deepspeed.config) to resume.")
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: resuming {where} with changed settings (compatible with it):\n  " + "\n  ".join(changed),
              file=sys.stderr, flush=True)
    if ckpt.needs_universal(meta, world_size, zero_stage):
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was saved with world size {meta['world_size']} (ZeRO stage {meta.get('zero_stage')}), "
            f"this run has world size {world_size}; ZeRO optimizer partitions cannot be re-split directly.\n"
            f"Convert it to a universal checkpoint first:\n  {ckpt.universal_command(root, tag)}")
    return universal


def keep_flat_layout(meta: dict, ds_config: dict, zero_stage: int, where: str, is_main: bool) -> None:
    """A ZeRO-1/2 checkpoint can only be loaded with the flat-buffer layout it was saved with: one written without
    parameter_alignment (older markers do not record it) is resumed without it, with a warning."""
    zero = ds_config.setdefault("zero_optimization", {})
    saved = bool(meta.get("parameter_alignment", False))
    if zero_stage in (1, 2) and saved != bool(zero.get("parameter_alignment")):
        zero["parameter_alignment"] = saved
        if is_main:
            print(f"warning: {where} was saved with zero_optimization.parameter_alignment={str(saved).lower()}; "
                  f"resuming with that layout (a fresh run gets every weight 16-byte aligned)", file=sys.stderr,
                  flush=True)


@owns_output_dir  # the output dir is locked for the run; --resume none never mixes two runs
def train(recipe: Recipe, output_dir: str, max_steps: Optional[int] = None, resume: str = "auto", *,
          model: Optional[torch.nn.Module] = None, forward: Callable = default_forward,
          param_groups: Optional[list] = None) -> dict:
    """Run (or continue) the recipe; returns a summary. `model`/`forward`/`param_groups` let downstream tasks
    reuse the loop with another model (forward(engine, images, labels) must return an object with .loss)."""
    from deepspeed.utils import logger as ds_logger

    from mff_ds.data import IMAGENET_MEAN, IMAGENET_STD, build_loader, normalize

    ds_logger.setLevel(os.environ.get("MFF_DS_LOG_LEVEL", "WARNING"))
    env: DistEnv = init_distributed()
    world, rank = env.world_size, env.rank
    problems = check(recipe, world)
    if problems:
        raise RecipeError(problems)
    device = device_for(env.local_rank)
    ds_config = build_ds_config(recipe, world, device)
    precision = precision_of(ds_config)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    is_main = rank == 0
    ckpt_root = os.path.join(output_dir, "checkpoints")

    # resume target first: world-size / recipe checks before any heavy work
    found = ckpt.find(output_dir, resume)
    if found and ckpt.needs_universal(found[2], world, zero_stage):
        found = ckpt.to_universal(*found)  # saved by another world size: converted once, then loaded as universal
    if found:
        root, tag, meta = found
        if check_resume(meta, recipe, world, zero_stage, root, tag):
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        else:
            keep_flat_layout(meta, ds_config, zero_stage, os.path.join(root, tag), is_main)

    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        save_recipe(recipe, os.path.join(output_dir, "recipe.yaml"))
        write_json(os.path.join(output_dir, "ds_config.json"), ds_config)

    # model: identical init on every rank, then per-rank randomness (masks) as the reference (diff_rank_seed)
    seed_everything(recipe.seed)
    if model is None:
        from mff_ds.models import build_model
        model = build_model(recipe.model_config())
    if param_groups is None:
        param_groups = (model.param_groups(recipe.optim.weight_decay, decay_fusion_logits=recipe.optim.decay_fusion_logits)
                        if hasattr(model, "param_groups") else
                        [{"params": [p for p in model.parameters() if p.requires_grad],
                          "weight_decay": recipe.optim.weight_decay}])
    A = recipe.grad_accum(world)
    img_size = getattr(getattr(model, "cfg", None), "img_size", None) or recipe.model_config().img_size
    loader_kw = dict(img_size=img_size, micro_batch=recipe.batch.micro_batch, rank=rank, world_size=world,
                     seed=recipe.seed)
    loader = build_loader(recipe.data, epoch=0, **loader_kw)
    batches_per_epoch = len(loader)
    steps_per_epoch, total_steps, warmup_steps, stop_step = schedule_steps(recipe, batches_per_epoch, A, max_steps)

    peak_lr = recipe.lr()
    engine, optimizer = build_deepspeed_engine(model, param_groups, ds_config, lr=peak_lr,
                                               betas=recipe.optim.betas, eps=recipe.optim.eps, device=device)
    if recipe.deepspeed.compile:  # in place: parameter and checkpoint names stay those of the eager model
        engine.compile(compile_kwargs={"mode": recipe.deepspeed.compile_mode})
    dtype = DTYPES[precision]
    mcfg = getattr(engine.module, "cfg", None)
    seed_everything(recipe.seed + rank)

    pos = Position()
    meta_base = {"recipe_hash": recipe.compat_hash(), "compat": recipe.compat_dict(), "recipe": recipe.to_dict(),
                 "world_size": world, "zero_stage": zero_stage, "precision": precision, "name": recipe.name,
                 "parameter_alignment": bool(ds_config.get("zero_optimization", {}).get("parameter_alignment"))}

    def restore(root, tag, rollback=False):
        client = ckpt.load(engine, root, tag)
        pos.step = int(client["step"])
        if not rollback:  # a rollback keeps the data position: the bad stretch is skipped
            pos.epoch, pos.batch = int(client["epoch"]), int(client["batch"])
            per_batch = recipe.batch.micro_batch * world
            if client.get("samples") is not None and int(client["samples"]) != pos.batch * per_batch:
                pos.batch = int(client["samples"]) // per_batch  # other world size / micro batch (universal)
        rng = client.get("rng") or []
        if not rollback and len(rng) == world:
            ckpt.set_rng_state(rng[rank])
        else:
            seed_everything(recipe.seed + rank + 7919 * (pos.step + 1) + pos.rollbacks)

    if found:
        restore(found[0], found[1])

    def save():
        states = _gather_rng()
        client = {"step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "rng": states,
                  "samples": pos.batch * recipe.batch.micro_batch * world,  # of this epoch, all ranks
                  "mff_meta": dict(meta_base, step=pos.step), **ckpt.universal_info()}
        meta = dict(meta_base, epoch=pos.epoch, batch=pos.batch)
        return ckpt.save(engine, ckpt_root, pos.step, client, meta, recipe.checkpoint.keep_last)

    logger = mlog.MetricsLogger(output_dir, is_main, recipe.logging.tensorboard)
    flops = _flops_per_image(engine.module)
    peak = mlog.peak_tflops(device, recipe.logging.peak_tflops)
    mean, std = [v / 255 for v in IMAGENET_MEAN], [v / 255 for v in IMAGENET_STD]
    bar = mlog.progress_bar(is_main and recipe.logging.progress_bar, stop_step, pos.step)
    if is_main and pos.step:
        bar.write(f"resumed from {found[0]}/{found[1]} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")

    loss_sum = torch.zeros((), device=device)
    n_micro = 0
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    t_mark, steps_mark, last_loss, first_loss = time.time(), pos.step, None, None
    last_saved = pos.step if found else -1
    out = x = own_gn = None
    own_norm = norm_is_ours(ds_config, precision)

    def nonfinite_check() -> Optional[int]:
        """Collective; the first optimizer step (0-based) with a non-finite loss on any rank, or None."""
        s = torch.where(first_bad < 0, torch.full_like(first_bad, NEVER), first_bad)
        s = int(_all_reduce(s, dist.ReduceOp.MIN).item())
        first_bad.fill_(-1)
        return None if s >= NEVER else s

    def handle_nonfinite(at: int) -> bool:
        """Roll back (returns True) or raise."""
        nonlocal n_micro
        last = ckpt.complete_tags(ckpt_root)
        msg = (f"loss became NaN/Inf at optimizer step {at + 1} (lr {lr_at(at, total_steps, warmup_steps, peak_lr, recipe.optim.min_lr, recipe.schedule.warmup_start_factor):.3g}, "
               f"precision {precision}); no checkpoint was written after it.")
        if recipe.on_nonfinite == "rollback" and last and pos.rollbacks < recipe.max_rollbacks:
            pos.rollbacks += 1
            restore(ckpt_root, last[-1][1], rollback=True)
            loss_sum.zero_()
            n_micro = 0
            if is_main:
                bar.write(f"{msg} Rolled back to {last[-1][1]} (rollback {pos.rollbacks}/{recipe.max_rollbacks}); "
                          f"the data stream continues past the bad batches.")
                bar.n = pos.step
            return True
        hint = (f"Last complete checkpoint: {os.path.join(ckpt_root, last[-1][1])}." if last else "No checkpoint yet.")
        raise NonFiniteLossError(f"{msg} {hint} Lower optim.base_lr, use bf16, enable optim.grad_clip, or set "
                                 f"on_nonfinite: rollback; then rerun with --resume auto.")

    stopper = StopOnSignal.install()  # SIGUSR1 (MFF_DS_STOP_SIGNALS): save at the next check and exit
    try:
        per_epoch = steps_per_epoch * A
        while pos.step < stop_step:
            if pos.batch >= per_epoch:
                pos.epoch, pos.batch = pos.epoch + 1, 0
            loader.set_epoch(pos.epoch, skip_batches=pos.batch)  # reuses the (persistent) workers
            for images, labels in loader:
                if pos.batch >= per_epoch or pos.step >= stop_step:
                    break
                if pos.batch % A == 0:
                    set_lr(optimizer, lr_at(pos.step, total_steps, warmup_steps, peak_lr, recipe.optim.min_lr,
                                            recipe.schedule.warmup_start_factor))
                x = normalize(images.to(device, non_blocking=True), dtype=dtype)
                out = forward(engine, x, labels)
                engine.backward(out.loss)
                nxt = pos.step + 1
                if (own_norm and (pos.batch + 1) % A == 0
                        and (nxt % recipe.logging.every_steps == 0 or nxt == stop_step)):
                    own_gn = grad_norm(engine)  # DeepSpeed does not take it (or not every step): here, log steps only
                engine.step()
                loss = out.loss.detach().float()
                loss_sum += loss
                n_micro += 1
                first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), pos.step, first_bad)
                pos.batch += 1
                if pos.batch % A:
                    continue
                pos.step += 1
                bar.update(1)
                step = pos.step
                if stopper.requested(step, device):  # collective
                    stop_step = step  # log, checkpoint and leave the loop at this step
                is_log = step % recipe.logging.every_steps == 0 or step == stop_step
                is_ckpt = (recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0) or step == stop_step
                if is_log or is_ckpt:
                    at = nonfinite_check()
                    if at is not None:
                        if handle_nonfinite(at):
                            t_mark, steps_mark = time.time(), pos.step
                            continue
                if is_log:
                    mean_loss = (_all_reduce(loss_sum.clone()) / (n_micro * world)).item()
                    dt = max(time.time() - t_mark, 1e-9)
                    ips = (step - steps_mark) * recipe.batch.global_batch / dt
                    lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
                    m = {"loss": mean_loss, "lr": lr, "loss_scale": _loss_scale(engine),
                         "skipped_steps": int(engine.skipped_steps), "epoch": pos.epoch, "images_per_s": ips}
                    gn = engine.get_global_grad_norm()
                    gn = own_gn if gn is None else gn
                    if gn is not None:
                        m["grad_norm"] = float(gn)
                    fw = getattr(out, "fusion_weights", None)
                    if fw is not None:
                        m.update({f"fusion/w{i}": float(w) for i, w in enumerate(fw.detach().float().cpu())})
                    if flops and peak:
                        m["mfu"] = flops * ips / (peak * 1e12 * world)
                    m["data/bad_samples"] = loader.bad_samples  # this rank, this epoch (skipped files)
                    m.update(mlog.memory_gb(device))
                    logger.log(step, m)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                    first_loss = mean_loss if first_loss is None else first_loss
                    last_loss = mean_loss
                    loss_sum.zero_()
                    n_micro = 0
                    t_mark, steps_mark = time.time(), step
                t_extra = time.time()
                if (is_main and recipe.logging.image_every_steps and hasattr(out, "pred") and mcfg is not None
                        and (step % recipe.logging.image_every_steps == 0 or step == stop_step)):
                    k = recipe.logging.num_images
                    grid = mlog.reconstruction_grid(x[:k], out.pred[:k], out.mask[:k], mcfg.patch_size, mean, std,
                                                    mcfg.norm_pix_loss)
                    logger.image("reconstruction", grid, step)
                    mlog.save_png(grid, os.path.join(output_dir, f"reconstruction_step{step:07d}.png"))
                    mlog.save_png(grid, os.path.join(output_dir, "reconstruction.png"))
                if is_ckpt:
                    save()
                    last_saved = step
                t_mark += time.time() - t_extra  # images/s counts training only
            if pos.step < stop_step:
                pos.batch = per_epoch  # epoch done (or the loader ran dry early): next epoch

        if last_saved != pos.step:
            save()
        exported = []
        tag = f"global_step{pos.step}"
        if recipe.checkpoint.export and is_main and mcfg is not None and not stopper.stopped_by:
            exported = ckpt.export(engine, ckpt_root, tag, output_dir,
                                   {"step": pos.step, "recipe": recipe.name, "precision": precision})
        if dist.is_initialized():
            dist.barrier()
    finally:
        stopper.restore()
        bar.close()
        logger.close()
    return {"step": pos.step, "total_steps": total_steps, "first_loss": first_loss, "last_loss": last_loss,
            "output_dir": output_dir, "exported": exported, "rollbacks": pos.rollbacks, "stopped_by": stopper.stopped_by}


def _gather_rng() -> list:
    from .distributed import all_gather_object
    return all_gather_object(ckpt.rng_state())
