"""Property tests (hypothesis) for the arithmetic every run depends on: the batch split and its nearest
alternatives (engine.batch, engine.recipe.plan_batch) and the lr schedule (engine.schedule) against independent
step-by-step recurrences written here: mmengine's chained LinearLR / CosineAnnealingLR as its schedulers step them,
and official MAE's per-iteration `adjust_learning_rate` as its `train_one_epoch` calls it.

Derandomized (the same examples on every run) so CI is reproducible; `HYPOTHESIS_PROFILE=deep` searches more."""
import math
import os

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mff_ds.engine import batch
from mff_ds.engine.recipe import BatchConfig, RecipeError, plan_batch
from mff_ds.engine.schedule import LrSchedule

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("deep", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ------------------------------------------------------------------ batch arithmetic, from the definitions
def exact_micros(global_batch, max_micro, world, multiple):
    """Every micro batch that splits `global_batch` exactly over `world` ranks (brute force)."""
    if global_batch % world:
        return []
    k = global_batch // world
    return [m for m in range(1, min(k, max_micro) + 1) if k % m == 0 and m % multiple == 0]


def is_efficient(global_batch, micro, max_micro, world):
    k = global_batch // world
    fewest = -(-k // max_micro)  # the fewest accumulation steps
    return 2 * micro >= -(-k // fewest)


sizes = dict(global_batch=st.integers(1, 1500), max_micro=st.integers(1, 96), world=st.integers(1, 24),
             multiple=st.integers(1, 4))


@given(**sizes)
def test_split_is_exact_and_takes_the_largest_micro_batch(global_batch, max_micro, world, multiple):
    plan = batch.split(global_batch, max_micro, world, multiple)
    micros = exact_micros(global_batch, max_micro, world, multiple)
    if not micros:
        assert plan is None
        return
    assert plan.world * plan.micro * plan.accum == plan.global_batch == global_batch
    assert plan.micro == max(micros) and plan.micro <= max_micro and plan.micro % multiple == 0


@given(**sizes)
def test_nearest_ends_and_is_really_the_nearest(global_batch, max_micro, world, multiple):
    if multiple > max_micro:  # no micro batch can be a multiple: refused, not searched
        with pytest.raises(ValueError, match="micro batch multiple"):
            batch.nearest(global_batch, max_micro, world, multiple)
        return
    plans = batch.nearest(global_batch, max_micro, world, multiple)
    below = [p for p in plans if p.global_batch < global_batch]
    above = [p for p in plans if p.global_batch > global_batch]
    assert len(above) == 1 and len(below) <= 1 and plans == below + above  # below first; above always exists
    for p in plans:
        assert p.world * p.micro * p.accum == p.global_batch and p.micro <= max_micro and p.micro % multiple == 0
        assert p == batch.split(p.global_batch, max_micro, world, multiple)
        assert is_efficient(p.global_batch, p.micro, max_micro, world)

    def efficient_exact(g):
        micros = exact_micros(g, max_micro, world, multiple)
        return bool(micros) and is_efficient(g, max(micros), max_micro, world)
    lo = below[0].global_batch if below else 0
    assert not any(efficient_exact(g) for g in range(lo + 1, global_batch))  # nothing closer below
    assert not any(efficient_exact(g) for g in range(global_batch + 1, above[0].global_batch))  # nor above
    if not below:
        assert not any(efficient_exact(g) for g in range(1, global_batch))


@given(**sizes, policy=st.sampled_from(["exact", "nearest"]), base_lr=st.floats(1e-6, 1e-2))
def test_a_recipes_plan_is_exact_or_refused_naming_the_nearest(global_batch, max_micro, world, multiple, policy,
                                                                base_lr):
    """engine.recipe.plan_batch: whatever the batch section, world and multiple, a plan whose numbers multiply out
    (with its lr), or one problem line naming the key; never a hang."""
    b = BatchConfig.model_construct(global_batch=global_batch, micro_batch=max_micro, global_batch_policy=policy)
    if multiple > max_micro:
        return  # refused by the batch section's own check (tests/test_batch.py)
    try:
        plan, note = plan_batch(b, base_lr, world, multiple)
    except Exception as e:  # the refusal is a pydantic custom error naming batch.global_batch
        assert policy == "exact" and batch.split(global_batch, max_micro, world, multiple) is None
        assert "nearest:" in str(e) and "batch.global_batch" in repr(e)
        return
    assert plan.world * plan.micro * plan.accum == plan.global_batch and plan.micro <= max_micro
    assert plan.micro % multiple == 0 and plan.lr == pytest.approx(base_lr * plan.global_batch / 256, rel=1e-12)
    if plan.global_batch != global_batch:
        closest = min(batch.nearest(global_batch, max_micro, world, multiple),
                      key=lambda p: (abs(p.global_batch - global_batch), p.global_batch))
        assert policy == "nearest" and plan.global_batch == closest.global_batch and "nearest" in note


@pytest.mark.timeout(120)  # it used to hang: fail instead
def test_a_micro_batch_below_the_pairs_is_refused_not_searched():
    """Mixup pairs images: a maximum micro batch of 1 used to send `nearest` searching forever."""
    with pytest.raises(RecipeError, match=r"batch\.micro_batch: Mixup / CutMix pair the images of a micro batch: "
                                          r"expected at least 2 .*, got 1"):
        from mff_ds.eval.recipe import load_eval_recipe
        load_eval_recipe("configs/finetune_demo.yaml", ["batch.micro_batch=1"], world_size=1)


# ------------------------------------------------------------------ mmengine's schedulers, step by step
class _Scheduler:
    """mmengine 0.10 `_ParamScheduler.step` over one param group: `global` counts every step() (one at
    construction), `last` only those inside [begin, end)."""

    def __init__(self, begin, end, value):
        self.begin, self.end, self.value, self.glob, self.last = begin, end, value, -1, -1

    def step(self, group):
        self.glob += 1
        if self.begin <= self.glob < self.end:
            self.last += 1
            group["lr"] = self.value(self.last, group["lr"])


def mmengine_lrs(base, start_factor, eta_min, epochs, warmup_epochs, per_epoch):
    """The lr of every iteration of one group (initial lr `base`) under mmpretrain's schedule as its configs write
    it: LinearLR(start_factor, by_epoch, begin=0, end=W) + CosineAnnealingLR(T_max=E-W, eta_min, begin=W, end=E),
    both convert_to_iter_based (build_iter_from_epoch), stepped after every iteration by ParamSchedulerHook."""
    n, total = int(warmup_epochs * per_epoch), epochs * per_epoch
    t_max = (epochs - warmup_epochs) * per_epoch
    sf, total_iters = start_factor, n - 1

    def linear(last, lr):  # LinearLR._get_value, end_factor 1
        if last == 0:
            return lr * sf
        return lr * (1.0 + (1.0 - sf) / (total_iters * sf + (last - 1) * (1.0 - sf)))

    def cosine(last, lr):  # CosineAnnealingLR._get_value; base_values = the group's initial lr
        if last == 0:
            return lr
        if (last - 1 - t_max) % (2 * t_max) == 0:
            return lr + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        return ((1 + math.cos(math.pi * last / t_max)) / (1 + math.cos(math.pi * (last - 1) / t_max))
                * (lr - eta_min) + eta_min)
    group = {"lr": base}
    schedulers = ([_Scheduler(0, n, linear)] if n > 0 else []) + [_Scheduler(n, total, cosine)]
    for s in schedulers:  # each scheduler steps once when it is built
        s.step(group)
    out = []
    for _ in range(total):
        out.append(group["lr"])
        for s in schedulers:
            s.step(group)
    return out


@st.composite
def mmengine_runs(draw):
    epochs = draw(st.integers(1, 25))
    per_epoch = draw(st.integers(1, 40))
    warmup = draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 0.25 * epochs]))
    assume(warmup < epochs)
    return dict(epochs=epochs, per_epoch=per_epoch, warmup=warmup, peak=draw(st.floats(1e-6, 1.0)),
                start_factor=draw(st.sampled_from([1e-9, 1e-4, 1e-3, 0.1, 0.5, 1.0])),
                eta_ratio=draw(st.sampled_from([0.0, 1e-3, 0.1, 0.9])), scale=draw(st.sampled_from(
                    [1.0, 0.65, 0.65 ** 13, 1e-5])))


@given(mmengine_runs())
def test_mmengine_schedule_equals_its_chained_schedulers_at_every_iteration(run):
    """Every epoch length, warmup (none, one iteration, fractional), start factor, eta_min and layer-decay scale:
    LrSchedule('mmengine') gives each group the lr mmengine's own recurrence does (eta_min absolute per group)."""
    peak, eta = run["peak"], run["eta_ratio"] * run["peak"]
    schedule = LrSchedule("mmengine", peak, eta, run["start_factor"], run["epochs"], run["warmup"],
                          run["per_epoch"], run["per_epoch"], 1)
    want = mmengine_lrs(peak * run["scale"], run["start_factor"], eta, run["epochs"], run["warmup"], run["per_epoch"])
    assert schedule.total_steps == len(want)
    for step, lr in enumerate(want):
        assert schedule.lr(step, run["scale"]) == pytest.approx(lr, rel=1e-9, abs=1e-12 * max(peak, eta)), step


# ------------------------------------------------------------------ official MAE, per iteration
def mae_step_lrs(lr, min_lr, warmup_epochs, epochs, loader_len, accum, scale, start_factor=0.0):
    """facebookresearch/mae: train_one_epoch calls lr_sched.adjust_learning_rate(optimizer, data_iter_step /
    len(data_loader) + epoch, args) at every data_iter_step % accum_iter == 0, and steps the optimizer at
    (data_iter_step + 1) % accum_iter == 0: the lr of each optimizer step, for a group of lr_scale `scale`. Its warmup
    rises from 0; `start_factor` (ours, for recipes that warm up from start_factor x lr) lifts the line's start."""
    out, current = [], None
    for epoch in range(epochs):
        for data_iter_step in range(loader_len):
            if data_iter_step % accum == 0:
                e = data_iter_step / loader_len + epoch
                if e < warmup_epochs:
                    v = lr * e / warmup_epochs * (1 - start_factor) + lr * start_factor
                else:
                    v = min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (e - warmup_epochs) /
                                                                     (epochs - warmup_epochs)))
                current = v * scale
            if (data_iter_step + 1) % accum == 0:
                out.append(current)
    return out


@given(epochs=st.integers(1, 12), loader_len=st.integers(1, 45), accum=st.integers(1, 8),
       warmup=st.sampled_from([0.5, 1.0, 2.0, 5.0]), peak=st.floats(1e-6, 1.0),
       min_ratio=st.sampled_from([0.0, 1e-3, 0.5]), scale=st.sampled_from([1.0, 0.75, 0.75 ** 25]),
       start_factor=st.sampled_from([0.0, 0.0, 1e-4, 0.5]))
def test_mae_schedule_equals_official_maes_per_iteration_formula(epochs, loader_len, accum, warmup, peak, min_ratio,
                                                                  scale, start_factor):
    """Every epoch length and accumulation, divisible or not (the partial group at an epoch's end takes no step
    of its own there): LrSchedule('mae') gives the lr official MAE steps with."""
    assume(warmup < epochs and loader_len >= accum)
    min_lr = min_ratio * peak
    schedule = LrSchedule("mae", peak, min_lr, start_factor, epochs, warmup, loader_len // accum, loader_len, accum)
    want = mae_step_lrs(peak, min_lr, warmup, epochs, loader_len, accum, scale, start_factor)
    assert schedule.total_steps == len(want)
    for step, lr in enumerate(want):
        assert schedule.lr(step, scale) == pytest.approx(lr, rel=1e-12, abs=1e-300), step


def test_schedule_edges_a_recipe_meets():
    """A group without lr_scale trains at scale 1; an epoch that does not divide into optimizer steps gives whole
    steps; an unknown reference is refused in one line."""
    from types import SimpleNamespace

    from mff_ds.engine.schedule import lr_schedule
    s = LrSchedule("mmengine", 1.0, 0.0, 0.5, 4, 1, 3, 3)
    groups = SimpleNamespace(param_groups=[{}, {"lr_scale": 0.5}])
    s.apply(groups, 1)
    assert [g["lr"] for g in groups.param_groups] == [s.lr(1), s.lr(1, 0.5)] == [0.75, 0.375]
    recipe = SimpleNamespace(schedule=SimpleNamespace(reference="mae", warmup_start_factor=0.0, epochs=2,
                                                      warmup_epochs=1.0), optim=SimpleNamespace(min_lr=0.0),
                             lr=lambda: 1.0)
    assert lr_schedule(recipe, 7, 2).steps_per_epoch == 3 and lr_schedule(recipe, 7, 2).total_steps == 6
    with pytest.raises(ValueError, match=r"^schedule.reference: expected one of \['mmengine', 'mae'\], got 'timm'$"):
        LrSchedule("timm", 1.0, 0.0, 0.5, 4, 1, 3, 3)
