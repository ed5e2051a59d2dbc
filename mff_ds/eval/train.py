"""Fine-tune / linear-probe loop on the pretraining engine, and evaluation of a classifier file.

Reused from mff_ds.engine: distributed init, the merged DeepSpeed config, `build_deepspeed_engine` (AdamW),
the warmup + cosine schedule `lr_at` / `set_lr` (per-group `lr_scale` = layer decay), checkpoints (completion
marker, atomic `latest`, keep-last-K, RNG state, exact mid-epoch resume, compatibility check) and the
MetricsLogger (metrics.jsonl + TensorBoard). Own parts: timm Mixup/CutMix + soft-target losses, LARS (timm),
evaluation (top-1/top-5) after every epoch and the best classifier kept as `best.safetensors`.

LARS computes one trust ratio per parameter, so the linear probe runs DeepSpeed in fp32 with ZeRO 0 (ZeRO and
DeepSpeed's 16-bit optimizers flatten parameters); on CUDA the frozen encoder still runs under bf16/fp16
autocast when the recipe's precision asks for it.
"""
import copy
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from mff_ds.common import DTYPES, seed_everything, write_json
from mff_ds.engine import checkpoint as ckpt
from mff_ds.engine import logging as mlog
from mff_ds.engine.distributed import device_for, init_distributed
from mff_ds.engine.optim import build_deepspeed_engine, build_ds_config, lr_at, precision_of, schedule_steps, set_lr
from mff_ds.engine.recipe import RecipeError
from mff_ds.engine.rundir import owns_output_dir
from mff_ds.engine.trainer import NonFiniteLossError, check_resume

from . import data as edata
from . import metrics
from . import models as emodels
from mff_ds.engine.recipe import save_recipe

from .recipe import EvalRecipe, check


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)


def _criterion(recipe: EvalRecipe, num_classes: int):
    """(mixup_fn or None, loss(logits, target)) as in the reference: Mixup/CutMix + soft-target CE with label
    smoothing, label-smoothing CE, or plain CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    a = recipe.augment
    if a.mixup > 0 or a.cutmix > 0:
        mix = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                    mode="batch", label_smoothing=a.smoothing, num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    if a.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(a.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def _average_bn_stats(module, world: int) -> None:
    """DeepSpeed does not broadcast buffers: average BatchNorm running statistics over ranks before evaluating
    and saving, so every rank evaluates (and the checkpoint keeps) the same probe."""
    if world > 1 and dist.is_initialized():
        for name, buf in module.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                dist.all_reduce(buf)
                buf.div_(world)


def _lars_groups(model, recipe: EvalRecipe) -> list:
    """Head weight with the trust ratio; head bias with it too (mmpretrain) unless lars_exclude_1d (MAE)."""
    o = recipe.optim
    groups = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = o.lars_exclude_1d and p.ndim <= 1
        groups.append({"params": [p], "name": n, "weight_decay": 0.0 if plain else o.weight_decay,
                       "always_adapt": not plain, "trust_coeff": o.trust_coeff})
    return groups


def _build_engine(model, recipe: EvalRecipe, ds_config: dict, device):
    """(engine, base optimizer): AdamW through engine.optim.build_deepspeed_engine, or LARS on the same engine."""
    o = recipe.optim
    peak = recipe.lr()
    if o.name == "adamw":
        if recipe.task == "finetune":
            groups = emodels.finetune_param_groups(model, o.weight_decay, o.layer_decay)
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": o.weight_decay}]
        return build_deepspeed_engine(model, groups, ds_config, lr=peak, betas=o.betas, eps=o.eps, device=device)
    import deepspeed
    from timm.optim import Lars
    model.to(device)
    opt = Lars(_lars_groups(model, recipe), lr=peak, momentum=o.momentum, weight_decay=o.weight_decay,
               trust_coeff=o.trust_coeff)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=copy.deepcopy(ds_config))
    return engine, opt


def _ds_config(recipe: EvalRecipe, world: int, device):
    """-> (DeepSpeed config, autocast dtype for the frozen encoder or None)."""
    cfg = build_ds_config(recipe, world, device)
    autocast = None
    if recipe.optim.name == "lars":
        p = precision_of(cfg)
        autocast = DTYPES[p] if p != "fp32" and device.type == "cuda" else None
        cfg["fp16"], cfg["bf16"] = {"enabled": False}, {"enabled": False}
        cfg.setdefault("zero_optimization", {})["stage"] = 0
    return cfg, autocast


@owns_output_dir
def run(recipe: EvalRecipe, output_dir: str, max_steps: Optional[int] = None, resume: str = "auto",
        quiet: bool = False) -> dict:
    """Train the classifier of `recipe` (continuing from a checkpoint under output_dir when resume='auto'),
    evaluate after every epoch; returns a summary with the best and last top-1/top-5."""
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(os.environ.get("MFF_DS_LOG_LEVEL", "WARNING"))
    env = init_distributed()
    world, rank, is_main = env.world_size, env.rank, env.rank == 0
    problems = check(recipe, world)
    if problems:
        raise RecipeError(problems)
    device = device_for(env.local_rank)
    ds_config, autocast = _ds_config(recipe, world, device)
    precision = precision_of(ds_config)
    dtype = DTYPES[precision]
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    ckpt_root = os.path.join(output_dir, "checkpoints")
    found = ckpt.find(output_dir, resume)
    if found:
        check_resume(found[2], recipe, world, zero_stage, found[0], found[1])
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        save_recipe(recipe, os.path.join(output_dir, "recipe.yaml"))
        write_json(os.path.join(output_dir, "ds_config.json"), ds_config)

    # model (identical on every rank), then data
    seed_everything(recipe.seed)
    encoder_sd, cfg = emodels.load_encoder(recipe.init.checkpoint, recipe.init.format, recipe.model)
    img_size = recipe.data.img_size or cfg.img_size
    A = recipe.grad_accum(world)
    train_loader, classes = edata.build_train_loader(
        recipe.data, edata.train_transform(recipe.task, img_size, recipe.augment),
        micro_batch=recipe.batch.micro_batch, rank=rank, world=world, seed=recipe.seed)
    val_loader, val_classes = edata.build_val_loader(recipe.data, edata.val_transform(img_size, recipe.augment),
                                                     batch=recipe.eval_batch, rank=rank, world=world)
    if classes and val_classes and classes != val_classes:
        raise ValueError(f"data: train classes {classes[:5]}... and val classes {val_classes[:5]}... differ; "
                         f"expected the same class folders")
    num_classes = recipe.data.num_classes or (len(classes) if classes else None)
    if num_classes is None:
        raise RecipeError(["data.num_classes: expected the number of classes for shard datasets, got None"])
    if classes and num_classes != len(classes):
        raise RecipeError([f"data.num_classes: the ImageFolder has {len(classes)} classes, got {num_classes}"])
    vit = dict(emodels.vit_kwargs(cfg), img_size=img_size)
    if recipe.task == "finetune":
        model = emodels.build_finetune_model(encoder_sd, cfg, num_classes, recipe.head.drop_path,
                                             recipe.head.init_std, img_size)
    else:
        model = emodels.build_linprobe_model(encoder_sd, cfg, num_classes, recipe.head.init_std, img_size)
        model.autocast_dtype = autocast
    engine, optimizer = _build_engine(model, recipe, ds_config, device)
    seed_everything(recipe.seed + rank)
    mixup, criterion = _criterion(recipe, num_classes)

    steps_per_epoch, total_steps, warmup_steps, stop_step = schedule_steps(recipe, len(train_loader), A, max_steps)
    peak_lr = recipe.lr()
    meta_base = {"recipe_hash": recipe.compat_hash(), "compat": recipe.compat_dict(), "recipe": recipe.to_dict(),
                 "world_size": world,
                 "zero_stage": zero_stage, "precision": precision, "name": recipe.name, "task": recipe.task}
    pos = Position()
    if found:
        client = ckpt.load(engine, found[0], found[1])
        for k in ("step", "epoch", "batch", "best_top1", "best_epoch", "history"):
            setattr(pos, k, client[k])
        rng = client.get("rng") or []
        if len(rng) == world:
            ckpt.set_rng_state(rng[rank])

    def save():
        from mff_ds.engine.distributed import all_gather_object
        client = {"step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "best_top1": pos.best_top1,
                  "best_epoch": pos.best_epoch, "history": pos.history, "rng": all_gather_object(ckpt.rng_state())}
        return ckpt.save(engine, ckpt_root, pos.step, client, dict(meta_base, epoch=pos.epoch, batch=pos.batch),
                         recipe.checkpoint.keep_last)

    logger = mlog.MetricsLogger(output_dir, is_main, recipe.logging.tensorboard)
    bar = mlog.progress_bar(is_main and recipe.logging.progress_bar and not quiet, stop_step, pos.step)
    if is_main and found and not quiet:
        bar.write(f"resumed from {found[0]}/{found[1]} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
    best_path = os.path.join(output_dir, "best.safetensors")
    per_epoch = steps_per_epoch * A
    loss_sum, n_micro = torch.zeros((), device=device), 0
    t_mark, steps_mark, last_saved = time.time(), pos.step, (pos.step if found else -1)
    forward = lambda x: engine(x)

    def end_of_epoch():
        nonlocal last_saved
        _average_bn_stats(engine.module, world)
        engine.eval()
        res = metrics.evaluate(forward, val_loader, device, dtype if recipe.task == "finetune" else torch.float32)
        engine.train()
        res["epoch"] = pos.epoch
        new_best = res["top1"] > pos.best_top1
        if new_best:
            pos.best_top1, pos.best_epoch = res["top1"], pos.epoch
        pos.history.append(res)
        logger.log(pos.step, dict(res, best_top1=pos.best_top1))
        if is_main and not quiet:
            bar.write(f"epoch {pos.epoch}: top1 {res['top1']:.2f}  top5 {res['top5']:.2f}  val_loss "
                      f"{res['val_loss']:.4f}  (best {pos.best_top1:.2f} @ epoch {pos.best_epoch})")
        last_epoch = pos.epoch + 1 == recipe.schedule.epochs
        pos.epoch, pos.batch = pos.epoch + 1, 0
        every = recipe.checkpoint.every_epochs
        tag = None
        if (every and pos.epoch % every == 0) or last_epoch or pos.step == stop_step:
            tag = f"global_step{pos.step}"
            save()
            last_saved = pos.step
        if new_best and is_main:
            sd = (ckpt.fp32_state_dict(engine, ckpt_root, tag) if tag else
                  {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()})
            emodels.save_classifier(sd, best_path, recipe.task, vit, num_classes,
                                    {"epoch": res["epoch"], "top1": res["top1"], "top5": res["top5"],
                                     "classes": classes, "recipe": recipe.name})

    engine.train()
    try:
        while pos.step < stop_step:
            train_loader.set_epoch(pos.epoch, skip_batches=pos.batch)
            for images, target in train_loader:
                if pos.batch >= per_epoch or pos.step >= stop_step:
                    break
                if pos.batch % A == 0:
                    set_lr(optimizer, lr_at(pos.step, total_steps, warmup_steps, peak_lr, recipe.optim.min_lr,
                                            recipe.schedule.warmup_start_factor))
                images = images.to(device, non_blocking=True)
                target = target.to(device, non_blocking=True)
                if mixup is not None:
                    images, target = mixup(images, target)
                logits = engine(images.to(dtype if recipe.task == "finetune" else torch.float32))
                loss = criterion(logits.float(), target)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
                n_micro += 1
                pos.batch += 1
                if pos.batch % A:
                    continue
                pos.step += 1
                bar.update(1)
                if pos.step % recipe.logging.every_steps == 0 or pos.step == stop_step:
                    mean_loss = loss_sum.clone()
                    if dist.is_initialized() and world > 1:
                        dist.all_reduce(mean_loss)
                    mean_loss = mean_loss.item() / (n_micro * world)
                    if not torch.isfinite(torch.tensor(mean_loss)):
                        raise NonFiniteLossError(f"loss became NaN/Inf by optimizer step {pos.step}; lower "
                                                 f"optim.base_lr or use fp32/bf16, then rerun with --resume auto")
                    g = optimizer.param_groups[0]
                    lr = g["lr"] / g.get("lr_scale", 1.0)
                    ips = (pos.step - steps_mark) * recipe.batch.global_batch / max(time.time() - t_mark, 1e-9)
                    logger.log(pos.step, {"loss": mean_loss, "lr": lr, "epoch": pos.epoch, "images_per_s": ips,
                                          **mlog.memory_gb(device)})
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    loss_sum.zero_()
                    n_micro = 0
                    t_mark, steps_mark = time.time(), pos.step
                if pos.batch >= per_epoch:
                    end_of_epoch()
                    t_mark = time.time()
                    break
                if pos.step >= stop_step:  # before the loader draws (and augments) another batch
                    break
            else:
                if pos.batch < per_epoch and pos.step < stop_step:  # the loader ran dry early
                    pos.batch = per_epoch
                    end_of_epoch()
        if last_saved != pos.step:
            save()
        if dist.is_initialized():
            dist.barrier()
    finally:
        bar.close()
        logger.close()
    last = pos.history[-1] if pos.history else {}
    best = next((h for h in pos.history if h["epoch"] == pos.best_epoch), {})
    summary = {"task": recipe.task, "step": pos.step, "total_steps": total_steps, "epochs_done": pos.epoch,
               "best_top1": best.get("top1"), "best_top5": best.get("top5"), "best_epoch": pos.best_epoch,
               "last_top1": last.get("top1"), "last_top5": last.get("top5"), "history": pos.history,
               "best_path": best_path if os.path.exists(best_path) else None, "output_dir": output_dir}
    if is_main:
        write_json(os.path.join(output_dir, "results.json"), summary)
        if not quiet and pos.history:
            print(metrics.table([dict(h, name=f"epoch {h['epoch']}") for h in pos.history],
                                ("name", "top1", "top5", "val_loss")))
    return summary


def evaluate_checkpoint(path: str, val_path: str, *, img_size: Optional[int] = None, batch: int = 128,
                        crop_pct: float = 0.875, interpolation: str = "bicubic", num_workers: int = 4,
                        num_heads: Optional[int] = None, output_dir: Optional[str] = None) -> dict:
    """top-1 / top-5 of a classifier file (ours, mmpretrain or official MAE) on an ImageFolder or shards."""
    from .recipe import AugConfig, EvalData
    env = init_distributed()
    device = device_for(env.local_rank)
    model, meta = emodels.load_classifier(path, num_heads)
    model.to(device).eval()
    size = img_size or meta["vit"]["img_size"]
    if size != meta["vit"]["img_size"]:
        raise ValueError(f"--img-size: the classifier was built for {meta['vit']['img_size']} px, got {size}")
    aug = AugConfig(val_crop_pct=crop_pct, val_interpolation=interpolation)
    d = EvalData(source="imagefolder" if os.path.isdir(val_path) else "webdataset", val_path=val_path,
                 num_workers=num_workers)
    loader, classes = edata.build_val_loader(d, edata.val_transform(size, aug), batch=batch, rank=env.rank,
                                             world=env.world_size)
    if classes and len(classes) != meta["num_classes"]:
        raise ValueError(f"{val_path}: {len(classes)} class folders, the classifier has {meta['num_classes']} classes")
    res = metrics.evaluate(model, loader, device)
    res.update(checkpoint=str(path), task=meta.get("task"))
    if output_dir and env.rank == 0:
        logger = mlog.MetricsLogger(output_dir, True, tensorboard=False)
        logger.log(0, res)
        logger.close()
    return res
