"""The one training loop, on a DeepSpeed engine, for every task: pretraining, fine-tuning, linear probing.

The loop knows only "a batch in, an output with `.loss` out". A `Task` builds the model, its data and its
engine, turns a batch into an output, adds its metrics, acts after a step and at the end of an epoch, and
finishes (exports, results). The loop owns what every task needs alike: distributed start-up, the DeepSpeed
config, resume (compatibility, universal conversion, exact data and RNG position), the lr from the
optimizer-step index, backward / step, the non-finite-loss check (stop or roll back), metrics on logging steps
only (the only host synchronisation), checkpoints, stop signals and the progress bar.
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mff_ds.common import DTYPES, seed_everything, write_json

from . import checkpoint as ckpt
from . import metrics
from .distributed import all_gather_object, device_for, init_distributed
from .optim import (build_deepspeed_engine, build_ds_config, grad_norm, lr_at, norm_is_ours, precision_of,
                    schedule_steps, set_lr)
from .recipe import RecipeError, resume_differences, save_recipe
from .rundir import owns_output_dir
from .signals import StopOnSignal

NEVER = 2**62


class NonFiniteLossError(RuntimeError):
    pass


class IncompatibleCheckpointError(RuntimeError):
    pass


class Task:
    """The hooks `fit` calls. `recipe` needs the shared sections (seed, batch, optim, schedule, deepspeed,
    checkpoint, logging) and `lr()`, `grad_accum(world)`, `compat_hash()`, `compat_dict()`, `to_dict()`."""
    quiet = False  # no progress bar or console lines (the loop's and the task's)

    def __init__(self, recipe):
        self.recipe = recipe

    def check(self, world: int) -> list:
        """Every problem of the recipe for this world size, as 'key: expected ..., got ...'."""
        return []

    def ds_config(self, world: int, device) -> dict:
        return build_ds_config(self.recipe, world, device)

    def build(self, run: "Run"):
        """-> (model, training loader) on the seeded global RNG. The loader has len() (micro-batches per epoch
        on this rank), set_epoch(epoch, skip_batches) and yields (images, labels)."""
        raise NotImplementedError

    def param_groups(self, model) -> list:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": self.recipe.optim.weight_decay}]

    def build_engine(self, run: "Run", model):
        """-> (DeepSpeed engine, base optimizer): AdamW over param_groups(); compiled when the recipe asks."""
        o = self.recipe.optim
        engine, optimizer = build_deepspeed_engine(model, self.param_groups(model), run.ds_config, lr=self.recipe.lr(),
                                                   betas=o.betas, eps=o.eps, device=run.device)
        if self.recipe.deepspeed.compile:  # in place: parameter and checkpoint names stay those of the eager model
            engine.compile(compile_kwargs={"mode": self.recipe.deepspeed.compile_mode})
        return engine, optimizer

    def forward(self, engine, images, labels):
        """A batch as the loader yields it -> an output with `.loss` (a scalar tensor on the device)."""
        raise NotImplementedError

    def log_extras(self, run: "Run", out, metrics: dict) -> dict:
        """More metrics for a logging step (the loop's are in `metrics`)."""
        return {}

    def after_step(self, run: "Run", out) -> None:
        """After each optimizer step's logging, before its checkpoint; not timed as training."""

    def end_epoch(self, run: "Run", epoch: int) -> None:
        """Epoch `epoch` is done (run.pos is already at the next one); may call run.save(). Not timed."""

    def state_dict(self) -> dict:
        """The task's own state, saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, run: "Run", stopped_by: Optional[str]) -> dict:
        """After the final checkpoint, every rank -> entries for the summary."""
        return {}


@dataclass
class Position:
    """Where the run is: optimizer steps done, epoch, micro-batches of this epoch consumed on each rank."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    rollbacks: int = 0


def check_resume(meta: dict, recipe, world_size: int, zero_stage: int, root: str, tag: str) -> bool:
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
    """A ZeRO-1/2 checkpoint can only be loaded with the flat-buffer layout it was saved with: a pretraining one
    written without parameter_alignment (older markers do not record it) is resumed without it, with a warning.
    Fine-tune markers that do not record it were written with the aligned default."""
    zero = ds_config.setdefault("zero_optimization", {})
    if "parameter_alignment" not in meta and "task" in meta:
        return
    saved = bool(meta.get("parameter_alignment", False))
    if zero_stage in (1, 2) and saved != bool(zero.get("parameter_alignment")):
        zero["parameter_alignment"] = saved
        if is_main:
            print(f"warning: {where} was saved with zero_optimization.parameter_alignment={str(saved).lower()}; "
                  f"resuming with that layout (a fresh run gets every weight 16-byte aligned)", file=sys.stderr,
                  flush=True)


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


class Run:
    """One fit(): what the hooks read (recipe, device, dtype, engine, optimizer, loader, pos, stop_step, logger,
    bar, output_dir, is_main, ...) and the loop's steps between batches."""

    def __init__(self, task: Task, output_dir: str, max_steps: Optional[int], resume: str):
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(os.environ.get("MFF_DS_LOG_LEVEL", "WARNING"))
        self.task, self.recipe, self.output_dir = task, task.recipe, output_dir
        env = init_distributed()
        self.world, self.rank, self.is_main = env.world_size, env.rank, env.rank == 0
        problems = task.check(self.world)
        if problems:
            raise RecipeError(problems)
        self.device = device_for(env.local_rank)
        self.ds_config = task.ds_config(self.world, self.device)
        self.precision = precision_of(self.ds_config)
        self.dtype = DTYPES[self.precision]
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.ckpt_root = os.path.join(output_dir, "checkpoints")
        found = self._resume_target(resume)
        if self.is_main:
            os.makedirs(output_dir, exist_ok=True)
            save_recipe(self.recipe, os.path.join(output_dir, "recipe.yaml"))
            write_json(os.path.join(output_dir, "ds_config.json"), self.ds_config)
        self._build(max_steps)
        self.pos = Position()
        if found:
            self.restore(found[0], found[1])
        self.last_saved = self.pos.step if found else -1
        self._start_metrics(found)

    def _resume_target(self, resume: str):
        """The checkpoint to resume (converted to universal when saved by another world size), checked before
        any heavy work."""
        found = ckpt.find(self.output_dir, resume)
        if found and ckpt.needs_universal(found[2], self.world, self.zero_stage):
            found = ckpt.to_universal(*found)  # converted once, then loaded as universal
        if found:
            root, tag, meta = found
            if check_resume(meta, self.recipe, self.world, self.zero_stage, root, tag):
                self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
            else:
                keep_flat_layout(meta, self.ds_config, self.zero_stage, os.path.join(root, tag), self.is_main)
        return found

    def _build(self, max_steps):
        """Model and data (identical init on every rank), engine, then per-rank randomness (masks, mixup) as the
        reference (diff_rank_seed); the schedule from the loader's length."""
        r = self.recipe
        seed_everything(r.seed)
        model, self.loader = self.task.build(self)
        self.accum = r.grad_accum(self.world)
        (self.steps_per_epoch, self.total_steps, self.warmup_steps,
         self.stop_step) = schedule_steps(r, len(self.loader), self.accum, max_steps)
        self.per_epoch = self.steps_per_epoch * self.accum
        self.engine, self.optimizer = self.task.build_engine(self, model)
        seed_everything(r.seed + self.rank)
        self.meta_base = {"recipe_hash": r.compat_hash(), "compat": r.compat_dict(), "recipe": r.to_dict(),
                          "world_size": self.world, "zero_stage": self.zero_stage, "precision": self.precision,
                          "name": r.name, "parameter_alignment": bool(
                              self.ds_config.get("zero_optimization", {}).get("parameter_alignment"))}
        if getattr(r, "task", None):
            self.meta_base["task"] = r.task

    def _start_metrics(self, found):
        r = self.recipe
        self.logger = metrics.MetricsLogger(self.output_dir, self.is_main, r.logging.tensorboard)
        self.bar = metrics.progress_bar(self.is_main and r.logging.progress_bar and not self.task.quiet, self.stop_step,
                                     self.pos.step)
        if self.is_main and found and not self.task.quiet:
            self.bar.write(f"resumed from {found[0]}/{found[1]} at step {self.pos.step} (epoch {self.pos.epoch}, "
                           f"batch {self.pos.batch})")
        self.loss_sum, self.n_micro = torch.zeros((), device=self.device), 0
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a bad loss
        self.t_mark, self.steps_mark, self.first_loss, self.last_loss = time.time(), self.pos.step, None, None
        self.own_norm, self.own_gn = norm_is_ours(self.ds_config, self.precision), None

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """A checkpoint of this step (collective): weights, optimizer, data position, every rank's RNG, task state."""
        p, mb = self.pos, self.recipe.batch.micro_batch
        client = {"step": p.step, "epoch": p.epoch, "batch": p.batch, "rng": all_gather_object(ckpt.rng_state()),
                  "samples": p.batch * mb * self.world,  # of this epoch, all ranks
                  "task": self.task.state_dict(), "mff_meta": dict(self.meta_base, step=p.step),
                  **ckpt.universal_info()}
        meta = dict(self.meta_base, epoch=p.epoch, batch=p.batch)
        self.last_saved = p.step
        return ckpt.save(self.engine, self.ckpt_root, p.step, client, meta, self.recipe.checkpoint.keep_last)

    def restore(self, root: str, tag: str, rollback: bool = False) -> None:
        """Load a checkpoint; a rollback keeps the data position (the bad stretch is skipped) and reseeds."""
        client = ckpt.load(self.engine, root, tag)
        p = self.pos
        p.step = int(client["step"])
        self.task.load_state_dict(client.get("task", client))  # older fine-tune checkpoints: at the top level
        rng = client.get("rng") or []
        if rollback or len(rng) != self.world:
            seed_everything(self.recipe.seed + self.rank + 7919 * (p.step + 1) + p.rollbacks)
        else:
            ckpt.set_rng_state(rng[self.rank])
        if rollback:
            return
        p.epoch, p.batch = int(client["epoch"]), int(client["batch"])
        per_batch = self.recipe.batch.micro_batch * self.world
        if client.get("samples") is not None and int(client["samples"]) != p.batch * per_batch:
            p.batch = int(client["samples"]) // per_batch  # another world size / micro batch (universal)
        if p.batch >= self.per_epoch:  # saved at the end of an epoch
            p.epoch, p.batch = p.epoch + 1, 0

    # ------------------------------------------------------------------ between batches
    def set_lr(self) -> None:
        r = self.recipe
        set_lr(self.optimizer, lr_at(self.pos.step, self.total_steps, self.warmup_steps, r.lr(), r.optim.min_lr,
                                     r.schedule.warmup_start_factor))

    def is_log_step(self, step: int) -> bool:
        return step % self.recipe.logging.every_steps == 0 or step == self.stop_step

    def before_step(self) -> None:
        """After the step's last backward: the grad norm on logging steps where DeepSpeed does not take it."""
        if self.own_norm and (self.pos.batch + 1) % self.accum == 0 and self.is_log_step(self.pos.step + 1):
            self.own_gn = grad_norm(self.engine)

    def count(self, loss: torch.Tensor) -> None:
        """A micro-batch is done: its loss is summed on the device (no sync), a non-finite one remembered."""
        loss = loss.detach().float()
        self.loss_sum += loss
        self.n_micro += 1
        self.first_bad = torch.where(~torch.isfinite(loss) & (self.first_bad < 0), self.pos.step, self.first_bad)
        self.pos.batch += 1

    def step_done(self, out, stopper: StopOnSignal) -> bool:
        """An optimizer step is done: stop signal, non-finite check, log, task hook, epoch end, checkpoint.
        Returns True when the loop leaves this epoch's loader (epoch done, or the run's last step)."""
        p = self.pos
        p.step += 1
        self.bar.update(1)
        if stopper.requested(p.step, self.device):  # collective
            self.stop_step = p.step  # log, checkpoint and leave at this step
        every = getattr(self.recipe.checkpoint, "every_steps", 0)
        epoch_done = p.batch >= self.per_epoch
        is_log = self.is_log_step(p.step)
        is_ckpt = (every and p.step % every == 0) or p.step == self.stop_step
        rolled_back = (is_log or is_ckpt or epoch_done) and self.rolled_back()
        if is_log and not rolled_back:
            self.log(out)
        t = time.time()
        if not rolled_back:
            self.task.after_step(self, out)
        if epoch_done:
            self.end_epoch()
        if is_ckpt and not rolled_back and self.last_saved != p.step:
            self.save()
        self.t_mark += time.time() - t  # images/s counts training only
        return epoch_done or p.step >= self.stop_step

    def end_epoch(self) -> None:
        p = self.pos
        p.epoch, p.batch = p.epoch + 1, 0
        self.task.end_epoch(self, p.epoch - 1)

    def rolled_back(self) -> bool:
        """Collective. False when every loss since the last check was finite; True after rolling back to the
        last checkpoint (on_nonfinite: rollback); raises NonFiniteLossError otherwise."""
        s = torch.where(self.first_bad < 0, torch.full_like(self.first_bad, NEVER), self.first_bad)
        at = int(_all_reduce(s, dist.ReduceOp.MIN).item())
        self.first_bad.fill_(-1)
        if at >= NEVER:
            return False
        r, last = self.recipe, ckpt.complete_tags(self.ckpt_root)
        lr = lr_at(at, self.total_steps, self.warmup_steps, r.lr(), r.optim.min_lr, r.schedule.warmup_start_factor)
        msg = (f"loss became NaN/Inf at optimizer step {at + 1} (lr {lr:.3g}, precision {self.precision}); no "
               f"checkpoint was written after it.")
        if getattr(r, "on_nonfinite", "stop") == "rollback" and last and self.pos.rollbacks < r.max_rollbacks:
            self.pos.rollbacks += 1
            self.restore(self.ckpt_root, last[-1][1], rollback=True)
            self.loss_sum.zero_()
            self.n_micro = 0
            self.t_mark, self.steps_mark, self.bar.n = time.time(), self.pos.step, self.pos.step
            if self.is_main:
                self.bar.write(f"{msg} Rolled back to {last[-1][1]} (rollback {self.pos.rollbacks}/{r.max_rollbacks}); "
                               f"the data stream continues past the bad batches.")
            return True
        hint = f"Last complete checkpoint: {os.path.join(self.ckpt_root, last[-1][1])}." if last else "No checkpoint yet."
        raise NonFiniteLossError(f"{msg} {hint} Lower optim.base_lr, use bf16, enable optim.grad_clip"
                                 + (", or set on_nonfinite: rollback" if hasattr(r, "on_nonfinite") else "")
                                 + "; then rerun with --resume auto.")

    def log(self, out) -> None:
        """The logging step's metrics (one host sync: the mean loss over the interval and all ranks)."""
        step, eng = self.pos.step, self.engine
        mean_loss = (_all_reduce(self.loss_sum.clone()) / (self.n_micro * self.world)).item()
        ips = (step - self.steps_mark) * self.recipe.batch.global_batch / max(time.time() - self.t_mark, 1e-9)
        g = self.optimizer.param_groups[0]
        lr = g["lr"] / g.get("lr_scale", 1.0)
        m = {"loss": mean_loss, "lr": lr, "loss_scale": _loss_scale(eng), "skipped_steps": int(eng.skipped_steps),
             "epoch": self.pos.epoch, "images_per_s": ips}
        gn = eng.get_global_grad_norm()
        gn = self.own_gn if gn is None else gn
        if gn is not None:
            m["grad_norm"] = float(gn)
        if hasattr(self.loader, "bad_samples"):
            m["data/bad_samples"] = self.loader.bad_samples  # this rank, this epoch (skipped files)
        m.update(metrics.memory_gb(self.device))
        m.update(self.task.log_extras(self, out, m))
        self.logger.log(step, m)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        self.first_loss = mean_loss if self.first_loss is None else self.first_loss
        self.last_loss = mean_loss
        self.loss_sum.zero_()
        self.n_micro = 0
        self.t_mark, self.steps_mark = time.time(), step

    def finish(self, stopped_by: Optional[str]) -> dict:
        if self.last_saved != self.pos.step:
            self.save()
        summary = {"step": self.pos.step, "total_steps": self.total_steps, "first_loss": self.first_loss,
                   "last_loss": self.last_loss, "output_dir": self.output_dir, "rollbacks": self.pos.rollbacks,
                   "stopped_by": stopped_by}
        summary.update(self.task.finish(self, stopped_by))
        if dist.is_initialized():
            dist.barrier()
        return summary

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


@owns_output_dir  # the output dir is locked for the run; --resume none never mixes two runs
def fit(task: Task, output_dir: str, max_steps: Optional[int] = None, resume: str = "auto") -> dict:
    """Run (or continue, resume='auto') `task` to its last step or `max_steps`; returns a summary."""
    run = Run(task, output_dir, max_steps, resume)
    engine, pos = run.engine, run.pos
    stopper = StopOnSignal.install()  # SIGUSR1 (MFF_DS_STOP_SIGNALS): save at the next check and exit
    try:
        engine.train()
        while pos.step < run.stop_step:
            run.loader.set_epoch(pos.epoch, skip_batches=pos.batch)  # reuses the (persistent) workers
            for images, labels in run.loader:
                if pos.batch % run.accum == 0:
                    run.set_lr()
                out = task.forward(engine, images, labels)
                engine.backward(out.loss)
                run.before_step()
                engine.step()
                run.count(out.loss)
                if pos.batch % run.accum == 0 and run.step_done(out, stopper):
                    break
            else:  # the loader ran dry before the epoch's last step
                run.end_epoch()
        return run.finish(stopper.stopped_by)
    finally:
        stopper.restore()
        run.close()
