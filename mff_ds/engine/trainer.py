"""The one training loop, on a DeepSpeed engine, for every task: pretraining, fine-tuning, linear probing.

The loop knows only "a batch in, an output with `.loss` out". A `Task` builds the model, its data and its engine,
turns a batch into an output, adds its metrics, acts after a step and at the end of an epoch, and finishes
(exports, results). Its hooks see the run through a `RunView`. The loop owns what every task needs alike:
distributed start-up, the DeepSpeed config, resume (compatibility, universal conversion, exact data and RNG
position), the lr from the optimizer-step index, the non-finite-loss check and the rollback, metrics on logging
steps only (the only host synchronisation), checkpoints, stop signals and the progress bar, and where the time
goes (engine/phases.py: the start-up timeline, reported once after the first step; forward / backward / optimizer
time per logging interval, read without a sync).

Read `train_step` top to bottom for one micro-batch and, on an accumulation boundary, everything after it.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from mff_ds.common import DTYPES, UserError, seed_everything, startup_phase, write_json

from . import bad_samples
from . import checkpoint as ckpt
from . import ds_compat
from . import liveness
from .distributed import all_gather_object, device_for, init_distributed
from .goodput import Goodput
from .goodput import line as goodput_line
from .metrics import MetricsLogger, memory_gb, progress_bar
from .optim import build_deepspeed_engine, build_ds_config, grad_norm, norm_is_ours, precision_of, schedule_steps
from .phases import PhaseTimer, StartupClock, startup_line, startup_record
from .compat import Reconciled, resume_recipe
from .recipe import RecipeError, check, save_recipe
from .rundir import LOST_PEER_FILE, owns_output_dir
from .signals import StopOnSignal

NEVER = 2**62
# Input-bound: the loop waited for the loader for at least this fraction of the training time of a logging interval,
# for this many intervals in a row (the first interval, when the workers start, alone does not count)
INPUT_BOUND_FRACTION, INPUT_BOUND_INTERVALS = 0.2, 3


class NonFiniteLossError(UserError):
    """The loss became NaN/Inf and the run could not roll back (the CLIs exit 3)."""


class IncompatibleCheckpointError(UserError):
    pass


@dataclass
class Position:
    """Where the run is: optimizer steps done, epoch, micro-batches of this epoch consumed on each rank."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    rollbacks: int = 0


@dataclass(eq=False)
class RunView:
    """What a task's hooks see of the run, and all they may use.

    rank, world: this process and the number of processes; plan: the recipe's batch plan for them (global, micro,
    accumulation, lr); device, dtype, precision: where and in what the model
    computes; output_dir, ckpt_root (= output_dir/checkpoints); ds_config: the merged DeepSpeed config; engine: the
    DeepSpeed engine (None until built); step (optimizer steps done) and epoch: kept current by the loop;
    stop_step: the run's last step (max_steps, or the step a stop signal asked for); total_steps: of the schedule.
    resumed: the run continues from a checkpoint of its own (known before build(): initial weights a task loads
    there would be overwritten).
    save() -> the checkpoint directory of this step (collective: call it on every rank); log(metrics) writes a
    metrics line at this step, image(tag, picture) a TensorBoard image (rank 0 only); say(line) prints on rank 0
    unless the task is quiet."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    precision: str
    output_dir: str
    ds_config: dict
    plan: Any = None
    _pos: Position = field(default_factory=Position, repr=False)  # the loop's; hooks read step and epoch
    engine: Any = None
    stop_step: int = 0
    total_steps: int = 0
    resumed: bool = False
    save: Callable[[], str] = None
    log: Callable[[dict], None] = None
    image: Callable[[str, torch.Tensor], None] = None
    say: Callable[[str], None] = None

    @property
    def step(self) -> int:
        return self._pos.step

    @property
    def epoch(self) -> int:
        return self._pos.epoch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.output_dir, "checkpoints")


class Task:
    """The hooks `fit` calls. `recipe` has the shared sections (mff_ds.engine.recipe: seed, batch, optim, schedule,
    deepspeed, checkpoint, logging) and `plan`, `lr()`, `compat_hash()`, `compat_dict()`, `to_dict()`."""
    quiet = False  # no progress bar or console lines (the loop's and the task's)

    def __init__(self, recipe):
        self.recipe = recipe

    def check(self, world: int) -> list:
        """The task's own problems for this world size beyond the recipe's (engine.recipe.check, which the loop
        asks first), as 'key: expected ..., got ...'."""
        return []

    def prepare(self, is_main: bool) -> None:
        """Before the resume comparison, on every rank: settle what the recipe leaves to the run's inputs (a
        fine-tune's encoder comes from its checkpoint), so a resumed run compares what it trains. Called again when
        the resume keeps saved values (which may name other inputs): settle them anew, do no work twice."""

    def ds_config(self, world: int, device) -> dict:
        return build_ds_config(self.recipe, world, device)

    def build(self, run: RunView):
        """-> (model, training loader of micro batches of `run.plan.micro`) on the seeded global RNG. The loader has
        len() (micro-batches per epoch on this rank), set_epoch(epoch, skip_batches) and yields (images, labels); an
        optional close() is called when the run ends."""
        raise NotImplementedError

    def param_groups(self, model) -> list:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": self.recipe.optim.weight_decay}]

    def build_engine(self, run: RunView, model):
        """-> (DeepSpeed engine, base optimizer): AdamW over param_groups(); compiled when the recipe asks."""
        o = self.recipe.optim
        engine, optimizer = build_deepspeed_engine(model, self.param_groups(model), run.ds_config, lr=self.recipe.lr(),
                                                   betas=o.betas, eps=o.eps, device=run.device)
        d = self.recipe.deepspeed
        if d.compile or d.deepcompile:  # in place: parameter and checkpoint names stay those of the eager model;
            engine.compile(compile_kwargs={"mode": d.compile_mode})  # with compile.deepcompile, DeepSpeed's backend
        return engine, optimizer

    def forward(self, engine, images, labels):
        """A batch as the loader yields it -> an output with `.loss` (a scalar tensor on the device)."""
        raise NotImplementedError

    def log_extras(self, run: RunView, out, metrics: dict) -> dict:
        """More metrics for a logging step (the loop's are in `metrics`)."""
        return {}

    def after_step(self, run: RunView, out) -> None:
        """After each optimizer step's logging, before its checkpoint; not timed as training."""

    def end_epoch(self, run: RunView, epoch: int) -> None:
        """Epoch `epoch` is done (run.epoch is already the next one); may call run.save(). Not timed."""

    def data_identity(self) -> Optional[dict]:
        """What the training data holds, after build() (e.g. {"files", "content"} of the dataset index), or None:
        recorded in every checkpoint, and a resume on other data says so."""
        return None

    def state_dict(self) -> dict:
        """The task's own state, saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, run: RunView, stopped_by: Optional[str]) -> dict:
        """After the final checkpoint, every rank -> entries for the summary."""
        return {}


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


class LossMeter:
    """The loss of every micro-batch since the last logging step, summed on the device (no host sync), and the
    first optimizer step whose loss was not finite."""

    def __init__(self, device):
        self.sum, self.n = torch.zeros((), device=device), 0
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        self.sum += loss
        self.n += 1
        self.first_bad = torch.where(~torch.isfinite(loss) & (self.first_bad < 0), step, self.first_bad)

    def first_nonfinite(self) -> Optional[int]:
        """Collective (one host sync): the first step with a NaN/Inf loss on any rank since the last call, or None."""
        s = torch.where(self.first_bad < 0, torch.full_like(self.first_bad, NEVER), self.first_bad)
        at = int(_all_reduce(s, dist.ReduceOp.MIN).item())
        self.first_bad.fill_(-1)
        return None if at >= NEVER else at

    def mean(self, world: int) -> float:
        """Collective (one host sync): the mean loss over the interval and all ranks; the interval restarts."""
        m = (_all_reduce(self.sum.clone()) / (self.n * world)).item()
        self.reset()
        return m

    def reset(self) -> None:
        self.sum.zero_()
        self.n = 0


def reconcile_recipe(task: Task, found, zero_stage: int, recheck: Callable[[], int]) -> Reconciled:
    """The recipe resuming checkpoint `found` = (root, tag, marker): refused where it differs in a key set by hand;
    the run's saved values kept where this version changed a default (engine.compat.resume_recipe; `recheck` checks
    the recipe again with them), and the compatible changes, for one warning once the checkpoint is known to load."""
    root, tag, meta = found
    r = resume_recipe(meta, task.recipe, zero_stage, recheck)
    if r.incompatible:
        raise IncompatibleCheckpointError(
            f"checkpoint {os.path.join(root, tag)} was written by an incompatible recipe; differences:\n  " +
            "\n  ".join(r.incompatible) + "\nRevert these settings, or start afresh with --resume fresh (moves the "
            "old run aside) / another --output-dir.")
    return r


def newest_checkpoint(root: str) -> str:
    """What a rerun continues from, in words."""
    tags = ckpt.complete_tags(root)
    return f"newest complete checkpoint {os.path.join(root, tags[-1][1])}" if tags else \
        f"no complete checkpoint under {root} yet"


def data_changed(found, now: Optional[dict]) -> None:
    """Warn when the data the run resumes on holds other files than when checkpoint `found` was written (files
    added to or removed from the folders, another list file's content): the settings bind a resume, the folders'
    content can change under it, and that must not go unsaid."""
    root, tag, meta = found
    then = meta.get("data")
    if then and now and then != now:
        print(f"warning: resuming {os.path.join(root, tag)} on other data: {then.get('files')} files when it was "
              f"written, {now.get('files')} now (content {then.get('content')} -> {now.get('content')}); "
              f"the sample order changes from this epoch on", file=sys.stderr, flush=True)


def check_resume(meta: dict, world_size: int, zero_stage: int, root: str, tag: str) -> bool:
    """Refuse a checkpoint this engine cannot load with a clear message; True when it is a universal checkpoint."""
    where = os.path.join(root, tag)
    universal = bool(meta.get("universal"))
    if meta.get("zero_stage") not in (None, zero_stage) and not universal:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was saved with ZeRO stage {meta['zero_stage']}, this run uses stage {zero_stage}; "
            f"DeepSpeed cannot load one stage's optimizer state into another. Set deepspeed.zero_stage="
            f"{meta['zero_stage']} (or the same deepspeed.config) to resume.")
    if ckpt.needs_universal(meta, world_size, zero_stage):
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was saved with world size {meta['world_size']} (ZeRO stage {meta.get('zero_stage')}), "
            f"this run has world size {world_size}; ZeRO optimizer partitions cannot be re-split directly.\n"
            f"Convert it to a universal checkpoint first:\n  {ckpt.universal_command(root, tag)}")
    return universal


def same_flat_layout(meta: dict, ds_config: dict, zero_stage: int, where: str, is_main: bool) -> None:
    """A ZeRO-1/2 checkpoint loads only into the flat-buffer layout it was saved with: resume one saved without
    parameter_alignment without it, with a warning (a fresh run aligns every weight)."""
    zero = ds_config.setdefault("zero_optimization", {})
    saved = bool(meta["parameter_alignment"])
    if zero_stage in (1, 2) and saved != bool(zero.get("parameter_alignment")):
        zero["parameter_alignment"] = saved
        if is_main:
            print(f"warning: {where} was saved with zero_optimization.parameter_alignment={str(saved).lower()}; "
                  f"resuming with that layout (a fresh run gets every weight 16-byte aligned)", file=sys.stderr,
                  flush=True)


@dataclass(eq=False)
class Loop:
    """The loop's own state (the hooks see `view`): engine, data, schedule, position, metrics, console."""
    task: Task
    view: RunView
    engine: Any
    optimizer: Any
    loader: Any
    accum: int
    per_epoch: int          # micro-batches per epoch on each rank that make whole optimizer steps
    schedule: Any           # engine.schedule.LrSchedule: the lr of every step and param group
    meta: dict              # what every checkpoint marker of this run records
    logger: MetricsLogger = None
    goodput: Optional[Goodput] = None  # this attempt's time accounting (rank 0 writes OUTPUT_DIR/goodput.json)
    bar: Any = None
    loss: LossMeter = None
    own_norm: bool = False  # the loop, not DeepSpeed, takes the grad norm (on logging steps)
    norm: Any = None        # this logging step's grad norm (own_norm)
    last_saved: int = -1
    last_save_time: float = 0.0  # time.monotonic() of the last save (or the start): checkpoint.every_minutes
    saver: Any = None       # engine.checkpoint.AsyncSaver (checkpoint.async), or None: synchronous saves
    saver_done: list = field(default_factory=list)  # stats of the synchronous saves not yet logged
    save_log: list = field(default_factory=list)    # the stats of every save of this run (the summary's)
    t_mark: float = 0.0     # images/s counts training only: hooks and checkpoints move the mark
    steps_mark: int = 0
    data_wait: float = 0.0  # seconds spent waiting for the loader since the last logging step
    input_bound: int = 0    # logging intervals in a row that were input-bound
    bad_seen: Any = None    # (epoch, batch, sample) already named in bad_samples/ (read on the first bad sample)
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    phases: PhaseTimer = None  # forward / backward / optimizer time of the steps since the last logging step
    clock: Optional[StartupClock] = None  # the start-up timeline, until the first optimizer step reports it
    first_wait: Optional[float] = None  # data_wait when the first batch arrived

    @property
    def pos(self) -> Position:
        return self.view._pos

    def lr(self, step: int) -> float:
        """The lr of step `step` for a group without layer decay (what the logs show)."""
        return self.schedule.lr(step)

    def is_log_step(self, step: int) -> bool:
        return step % self.task.recipe.logging.every_steps == 0 or step == self.view.stop_step

    def is_ckpt_step(self, step: int) -> bool:
        every = self.task.recipe.checkpoint.every_steps
        return bool(every and step % every == 0) or step == self.view.stop_step

    def time_due(self) -> bool:
        """checkpoint.every_minutes have passed since the last save, by this rank's clock (rank 0's decides)."""
        minutes = self.task.recipe.checkpoint.every_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= 60.0 * minutes


def train_step(s: Loop, images, labels, stopper: StopOnSignal) -> bool:
    """One micro-batch and, at the end of an optimizer step, everything after it. Returns True when the loop
    leaves this epoch's loader (the epoch is done, or the run's last step)."""
    p, v, task = s.pos, s.view, s.task
    boundary = (p.batch + 1) % s.accum == 0  # this micro-batch ends an optimizer step
    log_step = boundary and s.is_log_step(p.step + 1)
    if s.clock is not None and s.first_wait is None:  # the first batch is in hand
        s.clock.mark("first_batch")
        s.first_wait = s.data_wait
    if p.batch % s.accum == 0:
        s.schedule.apply(s.optimizer, p.step)
    s.phases.start()
    out = task.forward(s.engine, images, labels)
    s.phases.lap("forward")
    s.engine.backward(out.loss)
    s.phases.lap("backward")
    if log_step and s.own_norm:  # after the last backward, before step(): ZeRO-2 holds the reduced gradients
        s.norm = grad_norm(s.engine)
    s.engine.step()  # DeepSpeed steps the optimizer only at the boundary
    s.phases.lap("optimizer")
    s.loss.add(out.loss, p.step)
    p.batch += 1
    if not boundary:
        return False
    p.step += 1
    liveness.set_step(p.step)  # named when a peer is lost
    if s.clock is not None:
        report_startup(s)  # collective, once
    s.bar.update(1)
    # collective: every rank stops, saves by the clock (rank 0's) and stops for a failed background save at this step
    stop, (due, failed) = stopper.check(p.step, v.device, (v.is_main and s.time_due(),
                                                           s.saver is not None and s.saver.failed))
    if stop:
        v.stop_step = p.step
    if failed:
        s.saver.wait("stopping")  # raises the failure (every rank's thread agreed on it)
    epoch_done = p.batch >= s.per_epoch
    log_step, ckpt_step = s.is_log_step(p.step), s.is_ckpt_step(p.step) or bool(due)
    bad_at = s.loss.first_nonfinite() if log_step or ckpt_step or epoch_done else None  # collective
    if bad_at is not None:
        roll_back(s, bad_at)  # raises NonFiniteLossError when it may not
    if bad_at is None and log_step:
        log(s, out)
    t = time.time()
    if bad_at is None:
        task.after_step(v, out)
    if epoch_done:
        end_epoch(s)
    if bad_at is None and ckpt_step and s.last_saved != p.step:
        save(s)
    s.t_mark += time.time() - t
    return epoch_done or p.step >= v.stop_step


def report_startup(s: Loop) -> None:
    """After the first optimizer step, once per run (collective): every rank's start-up timeline gathered, the
    slowest rank's recorded with the first metrics line and printed on rank 0 (engine/phases.py)."""
    if s.view.device.type == "cuda":  # the step's compute, not its launches; the gather would wait for it anyway
        torch.cuda.synchronize(s.view.device)
    if s.saver is not None:  # the snapshot's host buffers, now that the optimizer state exists (torch makes it lazily)
        with startup_phase("checkpoint_snapshot"):
            s.saver.warm(s.engine)
    s.clock.mark("first_step")
    s.clock.move(s.data_wait - s.first_wait, "first_step", "first_batch")  # the loader's wait for later micro-batches
    t = time.time()
    mine = s.clock.timeline()
    s.goodput.startup(sum(v for k, v in mine["phases"].items() if k not in ("first_batch", "first_step")))
    record = startup_record(all_gather_object(mine))
    s.clock = None
    s.logger.attach(s.view.step, "startup", record)
    s.view.say(startup_line(record))
    s.t_mark += time.time() - t


def end_epoch(s: Loop) -> None:
    s.pos.epoch, s.pos.batch = s.pos.epoch + 1, 0
    s.task.end_epoch(s.view, s.pos.epoch - 1)


def log(s: Loop, out) -> None:
    """A logging step's metrics (the interval's mean loss: the one host sync)."""
    v, eng, r = s.view, s.engine, s.task.recipe
    mean_loss = s.loss.mean(v.world)
    steps, wall = v.step - s.steps_mark, max(time.time() - s.t_mark, 1e-9)
    ips = steps * r.batch.global_batch / wall
    lr = s.lr(v.step - 1)  # the step just taken
    data_time, data_frac = input_wait(s)
    m = {"loss": mean_loss, "lr": lr, "loss_scale": ds_compat.loss_scale(eng), "skipped_steps": int(eng.skipped_steps),
         "epoch": v.epoch, "images_per_s": ips, "data_time": data_time, "data_fraction": data_frac,
         **s.phases.take(steps), "step_time": wall / max(steps, 1)}  # per optimizer step, over the interval
    gn = eng.get_global_grad_norm()
    gn = s.norm if gn is None else gn
    if gn is not None:
        m["grad_norm"] = float(gn)
    s.norm = None
    if hasattr(s.loader, "bad_samples"):
        m["data/bad_samples"] = s.loader.bad_samples  # this rank, this epoch (skipped files)
    m.update(memory_gb(v.device))
    m.update(s.task.log_extras(v, out, m))
    saves(s)
    s.goodput.trained(v.step, wall)
    m["goodput"] = s.goodput.fraction()  # of the run's wall time so far, every attempt (goodput.json: the rest)
    s.logger.log(v.step, m)
    s.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", data=f"{100 * data_frac:.0f}%")
    s.first_loss = mean_loss if s.first_loss is None else s.first_loss
    s.last_loss = mean_loss
    s.t_mark, s.steps_mark = time.time(), v.step


def input_wait(s: Loop):
    """(seconds per optimizer step the loop waited for the loader, the fraction of training time that is) over the
    logging interval ending now (as mmengine and timm log data_time); warns once per input-bound stretch."""
    steps, wall = max(s.view.step - s.steps_mark, 1), max(time.time() - s.t_mark, 1e-9)
    data_time, frac = s.data_wait / steps, min(s.data_wait / wall, 1.0)
    s.data_wait = 0.0
    s.input_bound = s.input_bound + 1 if frac >= INPUT_BOUND_FRACTION else 0
    if s.input_bound == INPUT_BOUND_INTERVALS and s.view.is_main:  # a warning: printed for quiet tasks too
        every = s.task.recipe.logging.every_steps
        s.bar.write(f"warning: input-bound: the loop waited for data {100 * frac:.0f}% of the time over the last "
                    f"{INPUT_BOUND_INTERVALS * every} steps ({data_time:.3g} s per step); raise data.num_workers, "
                    f"use data.decode: gpu or WebDataset shards on faster storage (docs/DATA.md)", file=sys.stderr)
    return data_time, frac


def timed(loader, s: Loop):
    """The loader's batches, adding the time each took to arrive to s.data_wait; the samples it skipped are named."""
    it = None
    while True:
        t = time.perf_counter()
        try:
            it = iter(loader) if it is None else it  # starting the epoch (the workers' first batches) is waiting too
            batch = next(it)
        except StopIteration:
            return
        finally:  # also when it raises: BadDataError comes with the batch that crossed the limit, its files named too
            s.data_wait += time.perf_counter() - t
            if hasattr(loader, "take_bad"):
                record_bad(s, loader.take_bad())
        yield batch


def record_bad(s: Loop, records: list) -> None:
    """Every skipped sample (epoch, batch, sample, reason), once, in OUTPUT_DIR/bad_samples/rank<R>.tsv with the
    optimizer step that would have used it (the format: engine/bad_samples.py). A resumed run replays the stretch
    after its checkpoint: a (epoch, batch, sample) the file names already is not named again."""
    if not records:
        return
    path = bad_samples.rank_file(s.view.output_dir, s.view.rank)
    if s.bad_seen is None:
        s.bad_seen = {(r.epoch, r.batch, r.sample) for r in bad_samples.read(path)}
    new = [r for r in records if tuple(r[:3]) not in s.bad_seen]
    if new:
        bad_samples.append(path, s.pos.step + 1, new)
        s.bad_seen.update(tuple(r[:3]) for r in new)


def roll_back(s: Loop, at: int) -> None:
    """The loss was not finite at step `at`: back to the last checkpoint (on_nonfinite: rollback; the data stream
    continues past the bad batches), or NonFiniteLossError."""
    r, v = s.task.recipe, s.view
    if s.saver is not None:  # a save in flight (of a step whose loss was checked) is the one to roll back to
        s.saver.wait("rolling back")
    last = ckpt.complete_tags(v.ckpt_root)
    msg = (f"loss became NaN/Inf at optimizer step {at + 1} (lr {s.lr(at):.3g}, precision {v.precision}); no "
           f"checkpoint was written after it.")
    if r.on_nonfinite != "rollback" or not last or s.pos.rollbacks >= r.max_rollbacks:
        hint = f"Last complete checkpoint: {os.path.join(v.ckpt_root, last[-1][1])}." if last else "No checkpoint yet."
        raise NonFiniteLossError(f"{msg} {hint} Lower optim.base_lr, use bf16, enable optim.grad_clip, or set "
                                 f"on_nonfinite: rollback; then rerun with --resume auto.")
    s.pos.rollbacks += 1
    restore(s, v.ckpt_root, last[-1][1], rollback=True)
    s.loss.reset()
    s.phases.reset()
    s.t_mark, s.steps_mark, s.bar.n, s.data_wait = time.time(), v.step, v.step, 0.0
    if v.is_main:  # a warning: printed for quiet tasks too
        s.bar.write(f"{msg} Rolled back to {last[-1][1]} (rollback {s.pos.rollbacks}/{r.max_rollbacks}); the data "
                    f"stream continues past the bad batches.")


def save(s: Loop, wait: bool = False) -> str:
    """A checkpoint of this step (collective): weights, optimizer, data position, every rank's RNG, task state.
    Asynchronous (checkpoint.async): the loop pauses for the snapshot only; `wait`: return once it is complete
    (run.save() of a task's hook, the final save)."""
    p, v = s.pos, s.view
    t = time.perf_counter()
    client = {"step": p.step, "epoch": p.epoch, "batch": p.batch, "rng": all_gather_object(ckpt.rng_state()),
              "samples": p.batch * v.plan.micro * v.world,  # of this epoch, all ranks
              "task": s.task.state_dict(), "mff_meta": dict(s.meta, step=p.step), **ds_compat.universal_info()}
    s.last_saved, s.last_save_time = p.step, time.monotonic()
    stats = {"step": p.step, "async": s.saver is not None}
    tag_dir = ckpt.save(s.engine, v.ckpt_root, p.step, client, dict(s.meta, epoch=p.epoch, batch=p.batch),
                        s.task.recipe.checkpoint.keep_last, saver=s.saver, stats=stats)
    stats["stall_s"] = time.perf_counter() - t  # the loop's pause: a wait for the previous save included
    s.goodput.checkpoint(stats["stall_s"])
    if s.saver is None:
        s.saver_done.append(stats)
    elif wait:
        s.saver.wait("going on")
    return tag_dir


def saves(s: Loop) -> None:
    """The saves completed since the last call: one record each in the next metrics line ("checkpoints") and
    TensorBoard (checkpoints/*), and a line on the console."""
    done = s.saver_done + (s.saver.take_done() if s.saver is not None else [])
    s.saver_done = []
    for d in done:
        d = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
        s.save_log.append(d)
        s.logger.event(d["step"], "checkpoints", d)
        rate = d["bytes"] / max(d["write_s"], 1e-9) / 2**20
        s.view.say(f"checkpoint global_step{d['step']}: {d['bytes'] / 2**30:.2f} GiB; the loop paused "
                   f"{d['stall_s']:.2f} s; written {'in the background ' if d['async'] else ''}in {d['write_s']:.1f} s "
                   f"({rate:.0f} MiB/s)")


def restore(s: Loop, root: str, tag: str, rollback: bool = False) -> None:
    """Load a checkpoint; a rollback keeps the data position (the bad stretch is skipped) and reseeds."""
    client = ckpt.load(s.engine, root, tag)
    p, v, r = s.pos, s.view, s.task.recipe
    p.step = int(client["step"])
    s.task.load_state_dict(client["task"])
    rng = client.get("rng") or []
    if rollback or len(rng) != v.world:
        seed_everything(r.seed + v.rank + 7919 * (p.step + 1) + p.rollbacks)
    else:
        ckpt.set_rng_state(rng[v.rank])
    if rollback:
        return
    p.epoch, p.batch = int(client["epoch"]), int(client["batch"])
    per_batch = v.plan.micro * v.world
    if client.get("samples") is not None and int(client["samples"]) != p.batch * per_batch:
        p.batch = int(client["samples"]) // per_batch  # another world size / micro batch (universal)
    if p.batch >= s.per_epoch:  # saved at the end of an epoch
        p.epoch, p.batch = p.epoch + 1, 0


def resume_target(v: RunView, found):
    """The checkpoint to resume (converted to universal when saved by another world size), checked before any
    heavy work; sets the DeepSpeed config's loading options to match it."""
    if not found:
        return None
    zero_stage = zero_stage_of(v.ds_config)
    if ckpt.needs_universal(found[2], v.world, zero_stage):
        found = ckpt.to_universal(*found)  # converted once, then loaded as universal
    root, tag, meta = found
    if check_resume(meta, v.world, zero_stage, root, tag):
        v.ds_config.setdefault("checkpoint", {})["load_universal"] = True
    else:
        same_flat_layout(meta, v.ds_config, zero_stage, os.path.join(root, tag), v.is_main)
    return found


def zero_stage_of(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def checked(task: Task, world: int) -> None:
    """The recipe's problems for this world size (the check that makes its batch plan) and the task's own."""
    problems = check(task.recipe, world) or task.check(world)
    if problems:
        raise RecipeError(problems)


def setup(task: Task, output_dir: str, max_steps: Optional[int], resume: str) -> Loop:
    """Distributed start-up, the recipe's problems and batch plan for this world size, the checkpoint to resume
    (the recipe reconciled with it), the DeepSpeed config, model / data / engine (identical init on every rank; then
    per-rank randomness, as the reference's diff_rank_seed), the schedule from the loader's length, and the
    restored position."""
    clock = StartupClock()  # this rank's start-up timeline, from the process start (engine/phases.py)
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(os.environ.get("MFF_DS_LOG_LEVEL", "WARNING"))
    clock.mark("imports")
    r, env = task.recipe, init_distributed(task.recipe.distributed.timeout_s, output_dir,
                                           task.recipe.distributed.peer_timeout_s)
    clock.mark("distributed_init")
    ds_compat.check_version(env.rank == 0)
    checked(task, env.world_size)
    device = device_for(env.local_rank)
    task.prepare(env.rank == 0)
    ds_config = task.ds_config(env.world_size, device)
    with startup_phase("checkpoint_verify"):  # its own phase of the start-up record
        found = ckpt.find(output_dir, resume)  # collective: checksums verified in parallel

    def recheck() -> int:  # with the run's saved values (the encoder and the batch plan they give)
        nonlocal ds_config
        task.prepare(env.rank == 0)
        checked(task, env.world_size)
        ds_config = task.ds_config(env.world_size, device)
        return zero_stage_of(ds_config)
    said = reconcile_recipe(task, found, zero_stage_of(ds_config), recheck) if found else None
    precision = precision_of(ds_config)
    v = RunView(env.rank, env.world_size, device, DTYPES[precision], precision, output_dir, ds_config, r.plan)
    found = resume_target(v, found)
    v.resumed = bool(found)
    liveness.set_hint(lambda: newest_checkpoint(v.ckpt_root))
    record = os.path.join(output_dir, LOST_PEER_FILE)
    if v.is_main and os.path.exists(record):  # an earlier attempt's: kept one deep; this attempt's is written anew
        os.replace(record, record + ".previous")
    liveness.set_record(record)
    if said and said.warning() and v.is_main:
        print(f"warning: resuming {os.path.join(found[0], found[1])}: {len(said.kept)} saved setting(s) kept where "
              f"this version's defaults differ, {len(said.changed)} compatible change(s):\n  {said.warning()}",
              file=sys.stderr, flush=True)
    if v.is_main:
        if r.batch_note():  # the batch arithmetic changed the micro (or, policy nearest, the global) batch
            print(r.batch_note(), file=sys.stderr, flush=True)
        os.makedirs(output_dir, exist_ok=True)
        save_recipe(r, os.path.join(output_dir, "recipe.yaml"))
        write_json(os.path.join(output_dir, "ds_config.json"), ds_config)
    seed_everything(r.seed)
    clock.mark("recipe_check")
    model, loader = task.build(v)
    clock.mark("model_build")  # the data index the data layer times inside it goes to its own phase
    plan = v.plan
    schedule, v.stop_step = schedule_steps(r, len(loader), max_steps)
    v.total_steps = schedule.total_steps
    v.engine, optimizer = task.build_engine(v, model)
    seed_everything(r.seed + v.rank)
    zero = ds_config.get("zero_optimization", {})
    meta = {"format_version": ckpt.FORMAT_VERSION, "recipe_hash": r.compat_hash(), "compat": r.compat_dict(),
            "recipe": r.to_dict(), "world_size": v.world, "zero_stage": int(zero.get("stage", 0)),
            "precision": precision, "name": r.name, "parameter_alignment": bool(zero.get("parameter_alignment")),
            "batch_plan": {"global_batch": plan.global_batch, "micro_batch": plan.micro, "accumulation": plan.accum,
                           "world_size": plan.world, "policy": r.batch.global_batch_policy, "lr": plan.lr},
            "data": task.data_identity()}
    if found and v.is_main:
        data_changed(found, meta["data"])
    s = Loop(task, v, v.engine, optimizer, loader, plan.accum, schedule.steps_per_epoch * plan.accum, schedule, meta,
             own_norm=norm_is_ours(ds_config, precision))
    v.save = lambda: save(s, wait=True)  # complete on return: a hook may read it (a fine-tune's best weights)
    v.say = (lambda line: s.bar.write(line)) if v.is_main and not task.quiet else print_none
    if found:
        clock.mark("engine_init")
        restore(s, found[0], found[1])
        clock.mark("restore")
    s.last_saved = v.step if found else -1
    # an earlier attempt's lines after the step this one starts from (0: it found no checkpoint) are redone: dropped
    s.logger = MetricsLogger(output_dir, v.is_main, r.logging.tensorboard, resumed_at=v.step)
    s.goodput = Goodput(output_dir, clock.t0, v.step, v.is_main)
    liveness.on_end("goodput", lambda line: s.goodput.end("lost peer"))
    v.log, v.image = lambda m: s.logger.log(v.step, m), lambda tag, img: s.logger.image(tag, img, v.step)
    s.bar = progress_bar(v.is_main and r.logging.progress_bar and not task.quiet, v.stop_step, v.step)
    if found:
        v.say(f"resumed from {found[0]}/{found[1]} at step {v.step} (epoch {v.epoch}, batch {s.pos.batch})")
    if r.checkpoint.async_:  # collective; its host buffers are allocated after the first step (report_startup)
        s.saver = ckpt.AsyncSaver.make(v.engine, v.world, device, r.distributed.timeout_s, v.is_main, v.say)
    s.last_save_time = time.monotonic()
    s.loss, s.phases, s.clock = LossMeter(device), PhaseTimer(device), clock
    clock.mark("engine_init")  # with the metrics logger and the progress bar
    s.t_mark, s.steps_mark = time.time(), v.step
    return s


def print_none(line: str) -> None:
    """`say` on the ranks (and quiet tasks) that print nothing."""


def finish(s: Loop, stopped_by: Optional[str]) -> dict:
    """The last checkpoint (complete on disk before the task's exports read it), the summary and the task's
    entries in it, on every rank."""
    v = s.view
    if s.saver is not None:
        s.saver.wait("the final save" if s.last_saved != v.step else "stopping")
    if s.last_saved != v.step:
        save(s, wait=True)
    saves(s)
    summary = {"step": v.step, "total_steps": v.total_steps, "first_loss": s.first_loss, "last_loss": s.last_loss,
               "output_dir": v.output_dir, "rollbacks": s.pos.rollbacks, "stopped_by": stopped_by,
               "checkpoints": s.save_log}
    summary.update(s.task.finish(v, stopped_by))
    summary["goodput"] = s.goodput.end("stopped" if stopped_by else "done")
    v.say(goodput_line(summary["goodput"]))
    if dist.is_initialized():
        dist.barrier()
    return summary


@owns_output_dir  # the output dir is locked for the run; --resume none never mixes two runs
def fit(task: Task, output_dir: str, max_steps: Optional[int] = None, resume: str = "auto") -> dict:
    """Run (or continue, resume='auto') `task` to its last step or `max_steps`; returns a summary."""
    s = setup(task, output_dir, max_steps, resume)
    stopper = StopOnSignal.install()  # SIGUSR1 (MFF_DS_STOP_SIGNALS): save at the next check and exit
    try:
        s.engine.train()
        while s.pos.step < s.view.stop_step:
            s.loader.set_epoch(s.pos.epoch, skip_batches=s.pos.batch)  # reuses the (persistent) workers
            for images, labels in timed(s.loader, s):
                if train_step(s, images, labels, stopper):
                    break
            else:  # the loader ran dry before the epoch's last step
                end_epoch(s)
        return finish(s, stopper.stopped_by)
    except BaseException:
        if s.goodput is not None:
            s.goodput.end("error")
        raise
    finally:
        if s.saver is not None:  # an error left a save in flight: it is a good one (taken after a checked step)
            s.saver.close()
        stopper.restore()
        if hasattr(s.loader, "close"):  # stop persistent workers now, not when the garbage collector gets to them
            s.loader.close()
        if s.bar is not None:
            s.bar.close()
        if s.logger is not None:
            s.logger.close()
