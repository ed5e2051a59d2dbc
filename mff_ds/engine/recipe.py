"""What every recipe kind shares: the common sections (batch, optim, schedule, deepspeed, checkpoint, logging,
distributed),
YAML + `--set a.b=c` reading, path resolution and the resume comparison. The pretraining recipe is
mff_ds.pretrain.recipe, the fine-tune / linear-probe one mff_ds.eval.recipe."""
import copy
import hashlib
import json
import os
from dataclasses import replace
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple

import yaml
from pydantic import (AfterValidator, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from mff_ds.common import UserError
from mff_ds.engine import batch
from mff_ds.engine.batch import BatchPlan
from mff_ds.schema import (Bool, Float, NonNegFloat, NonNegInt, PosFloat, PosInt, Section, fail, float_, int_,
                           problem, problems_of)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# configs/ and ds_configs/ sit at the repo root in a checkout; an installed package carries them as package data
# in mff_ds/configs and mff_ds/ds_configs (pyproject.toml maps the folders)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecipeError(UserError):
    """A recipe that cannot run; `.problems` lists every problem as 'key: expected ..., got ...'."""

    def __init__(self, problems: List[str], source: str = "recipe"):
        self.problems = list(problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


class BatchConfig(Section):
    global_batch: PosInt = 4096       # images per optimizer step, all ranks together
    micro_batch: PosInt = 512         # the most images one device holds in a forward; the engine takes the largest
                                      # micro batch up to it that splits the global batch exactly (engine.batch)
    # where no split is exact: refuse, naming the nearest global batches and their lr (exact), or train with the
    # nearest one and say so at the start (nearest). Either way recipe.yaml records what was trained.
    global_batch_policy: Literal["exact", "nearest"] = "exact"

    @model_validator(mode="after")
    def _splits_over_the_world(self, info: ValidationInfo):
        # the world size comes from the launcher through the validation context (None: not checked), with the
        # recipe's base_lr for the lr each alternative gives (BaseRecipe._base_lr_for_the_batch_check)
        ctx = info.context or {}
        multiple = ctx.get("micro_multiple", 1)
        if self.micro_batch < multiple:  # Mixup / CutMix pair the images of a micro batch
            raise problem(f"Mixup / CutMix pair the images of a micro batch: expected at least {multiple} (micro "
                          f"batches are multiples of {multiple}), got {self.micro_batch}", key="batch.micro_batch")
        if ctx.get("world_size") and self.global_batch_policy == "exact":
            plan_batch(self, ctx.get("base_lr"), ctx["world_size"], multiple)  # the problem
        return self


def _betas(v: List[float]) -> List[float]:
    if len(v) != 2 or not all(0 <= x < 1 for x in v):
        raise ValueError(f"expected two numbers in [0, 1), got {v}")
    return v


Betas = Annotated[List[Float], AfterValidator(_betas)]


class OptimBase(Section):
    """What every optimizer section has; the pretraining and eval ones add their own keys and defaults."""
    base_lr: PosFloat = 1.5e-4        # lr = base_lr * global_batch / 256
    min_lr: NonNegFloat = 0.0         # end of the cosine; at most lr (checked by the recipe, which knows the batch)
    betas: Betas = [0.9, 0.95]
    eps: PosFloat = 1e-8
    weight_decay: NonNegFloat = 0.05
    grad_clip: NonNegFloat = 0.0      # 0 = no clipping (the reference)


class OptimConfig(OptimBase):
    decay_fusion_logits: Bool = True  # the reference decays the raw fusion logits


class ScheduleConfig(Section):
    # whose lr schedule this recipe follows, exact to the iteration (mff_ds.engine.schedule): mmengine = mmpretrain's
    # configs (LinearLR peaks at iteration N-1, eta_min absolute per group), mae = facebookresearch/mae's
    # lr_sched.py (fractional epochs, warmup from start_factor x lr, min_lr x each group's lr_scale)
    reference: Literal["mmengine", "mae"] = "mmengine"
    epochs: PosInt = 300
    warmup_epochs: NonNegFloat = 40.0
    warmup_start_factor: float_(ge=0, le=1) = 1e-4  # LinearLR start factor: 1e-4 (300e) / 1e-9 (800e); mae: 0

    @model_validator(mode="after")
    def _warmup_within_the_run(self):
        problems = []
        if self.warmup_epochs > self.epochs:
            problems.append(("warmup_epochs", f"expected in [0, epochs={self.epochs}], got {self.warmup_epochs}"))
        if self.reference == "mmengine" and self.warmup_start_factor == 0 and self.warmup_epochs > 0:
            # mmengine's LinearLR divides by total_iters x start_factor on its second iteration
            problems.append(("warmup_start_factor", "mmengine's LinearLR needs a start factor > 0 (1e-4 in "
                             "mmpretrain's configs; a warmup from exactly 0 is schedule.reference: mae), got 0"))
        fail(problems)
        return self


# torch.compile's modes; the CUDA-graph ones ("reduce-overhead", "max-autotune") are left out: DeepSpeed's
# gradient hooks and the per-step lr change run outside the graph and would force re-recording.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# DeepSpeed config keys the recipe's batch / optim sections set (engine.optim.build_ds_config)
RESERVED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "optimizer", "scheduler", "gradient_clipping")


def _json_object_file(path: str) -> str:
    """The file must be there and be a JSON object now, not when DeepSpeed starts minutes later."""
    found = resolve_path(path)
    try:
        with open(found) as f:
            tree = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"expected an existing JSON file, got {path!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise ValueError(f"expected a readable JSON file, got {found!r} ({why})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"expected a JSON object, got a {type(tree).__name__} in {found!r}")
    return path


def _not_reserved(overrides: Dict[str, Any]) -> Dict[str, Any]:
    fail([(k, "set by the recipe (batch / optim sections), not by overrides")
          for k in sorted(set(RESERVED_DS_KEYS) & set(overrides))])
    return overrides


class DeepSpeedSection(Section):
    config: Annotated[str, AfterValidator(_json_object_file)] = "ds_configs/zero2.json"  # from the repo root, or absolute
    zero_stage: Optional[Literal[0, 1, 2]] = None  # override zero_optimization.stage
    load_universal: Bool = False                   # resume from a ds_to_universal checkpoint (other world size)
    compile: Bool = False                          # torch.compile the model through the engine (engine.compile())
    compile_mode: Literal[COMPILE_MODES] = "default"
    deepcompile: Bool = False                      # DeepSpeed's DeepCompile (compile.deepcompile): ZeRO-1/2 compiled
                                                   # without Python hooks; CUDA only
    overrides: Annotated[Dict[str, Any], AfterValidator(_not_reserved)] = {}  # deep-merged into the DeepSpeed config


class CheckpointBase(Section):
    # `async` is a Python keyword: the field is async_, the recipe key (and what recipe.yaml writes) `async`
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, serialize_by_alias=True)
    keep_last: int_(ge=1) = 3
    every_steps: NonNegInt = 0        # a checkpoint every N optimizer steps; 0 = none by step count
    # a checkpoint once this many minutes have passed since the last one (any save restarts the clock); 0 = none by
    # time. Rank 0's clock decides; the ranks agree on it in the stop-signal check (every MFF_DS_STOP_CHECK_EVERY steps)
    every_minutes: NonNegFloat = 0.0
    # write checkpoints in the background: the loop pauses only for a copy of its state in host memory
    # (engine/checkpoint.py AsyncSaver; docs/RESUME.md); false = the loop waits for every write
    async_: Bool = Field(False, alias="async")


class CheckpointConfig(CheckpointBase):
    every_steps: NonNegInt = 1000     # 0 = only at the end
    export: Bool = True               # consolidated fp32 model + timm encoder at the end
    async_: Bool = Field(True, alias="async")  # on for pretraining


class LoggingConfig(Section):
    every_steps: int_(ge=1) = 50
    image_every_steps: NonNegInt = 1000  # reconstruction grid (TensorBoard + PNG); 0 = off
    num_images: int_(ge=1) = 4
    tensorboard: Bool = True
    progress_bar: Bool = True
    peak_tflops: Optional[PosFloat] = None  # per device, for MFU; None = from the device name (CUDA only)


class DistributedConfig(Section):
    # seconds a collective (DeepSpeed's groups included) waits for a rank that died or hangs before the run fails
    # (on CUDA, NCCL's flight recorder dumps then: docs/MULTINODE.md); the environment variable
    # MFF_DS_COLLECTIVE_TIMEOUT_S, when set, wins. Not compared on resume: the compat_dicts leave it out.
    timeout_s: PosFloat = 1800.0
    # seconds without a heartbeat after which a rank, its host or the rendezvous store counts as lost: the run ends
    # in about that time naming it, exit 69 (engine/liveness.py; docs/MULTINODE.md); 0 = off. MFF_DS_PEER_TIMEOUT_S
    # wins. Not compared on resume.
    peer_timeout_s: NonNegFloat = 45.0


def _run_name(name: str) -> str:
    if not name or "/" in name:  # it names the run directory
        raise ValueError(f"expected a non-empty name without '/', got {name!r}")
    return name


RunName = Annotated[str, AfterValidator(_run_name)]


class BaseRecipe(Section):
    """What every recipe kind (pretraining, eval) has, and derives the same way from its batch/optim sections.
    Subclasses narrow the section types (their own defaults and keys) and add their own sections."""
    name: RunName = "run"
    seed: int_(ge=0, lt=2**32) = 0    # numpy's generators take 32 bits
    precision: Literal["auto", "fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"] = "auto"  # docs/ENGINE.md "Precision"
    on_nonfinite: Literal["stop", "rollback"] = "stop"  # a NaN/Inf loss: stop, or back to the last checkpoint
    max_rollbacks: NonNegInt = 3
    batch: BatchConfig = Field(default_factory=BatchConfig)
    optim: OptimBase = Field(default_factory=OptimBase)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointBase = Field(default_factory=CheckpointBase)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    _batch_note: Optional[str] = PrivateAttr(default=None)  # what the batch arithmetic changed, said at the start
    _plan: Optional[BatchPlan] = PrivateAttr(default=None)  # the split for the world size it was checked for
    _requested: Optional[dict] = PrivateAttr(default=None)  # the batch section as written, before any plan
    # the dotted keys the user set (--set, or a YAML file that is not a shipped recipe); None: all of them
    # (a recipe built in code). engine.compat keeps a run's saved value where a key was not set by hand.
    _by_hand: Optional[frozenset] = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _base_lr_for_the_batch_check(cls, data, info: ValidationInfo):
        """The batch section is checked before the optim section exists: hand it the base_lr (for the lr of the
        alternatives it names) through the validation context; None when the recipe's own value is not a number."""
        if isinstance(info.context, dict) and isinstance(data, dict):
            optim = data.get("optim") if isinstance(data.get("optim"), dict) else {}
            default = cls.model_fields["optim"].get_default(call_default_factory=True).base_lr
            try:
                info.context["base_lr"] = float(optim.get("base_lr", default))
            except (TypeError, ValueError):
                info.context["base_lr"] = None
            info.context["micro_multiple"] = cls.micro_multiple(data)
        return data

    @model_validator(mode="after")
    def _batch_for_the_world(self, info: ValidationInfo):
        """The micro batch (and, with global_batch_policy nearest, the global batch) for the launcher's world size,
        which comes through the validation context (None: not checked). Runs once every field is valid; the batch
        section's own validator has already reported an impossible split among the other problems."""
        ctx = info.context or {}
        self._requested = self.batch.model_dump()
        if ctx.get("world_size"):
            self._adopt(*plan_batch(self.batch, self.optim.base_lr, ctx["world_size"], ctx.get("micro_multiple", 1)))
        return self

    def _adopt(self, plan: BatchPlan, note: Optional[str]) -> None:
        """Train with `plan`: the batch section then says what runs (recipe.yaml and the marker record it)."""
        self._plan, self._batch_note = plan, note
        self.batch.global_batch, self.batch.micro_batch = plan.global_batch, plan.micro

    @property
    def plan(self) -> BatchPlan:
        """The batch plan (global, micro, accumulation, world, lr) this recipe was checked for, by validation with a
        world size or by `check(recipe, world)`: the only one the engine reads."""
        if self._plan is None:
            raise RuntimeError("recipe.plan: the recipe was not checked for a world size; call "
                               "mff_ds.engine.recipe.check(recipe, world_size) first")
        return self._plan

    def by_hand(self, key: str) -> bool:
        """Whether the user set dotted `key` (or a section above or below it) rather than taking a default or a
        shipped recipe's value."""
        if self._by_hand is None:
            return True
        return any(key == h or key.startswith(h + ".") or h.startswith(key + ".") for h in self._by_hand)

    @classmethod
    def micro_multiple(cls, data: dict) -> int:
        """A micro batch must be a multiple of this, from the recipe's raw tree (Mixup / CutMix pair images)."""
        return 1

    def batch_note(self) -> Optional[str]:
        return self._batch_note

    @field_validator("optim")
    @classmethod
    def _min_lr_below_lr(cls, o, info: ValidationInfo):
        b = info.data.get("batch")  # absent when the batch section was refused
        if b is not None and o.min_lr > o.base_lr * b.global_batch / 256:
            fail([("min_lr", f"expected in [0, lr = base_lr*global_batch/256], got {o.min_lr}")])
        return o

    def lr(self) -> float:
        return self._plan.lr if self._plan is not None else batch.lr_for(self.optim.base_lr, self.batch.global_batch)

    def compat_dict(self) -> dict:
        """What a resumed run must share with its checkpoint (each kind says)."""
        raise NotImplementedError

    def compat_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.compat_dict(), sort_keys=True).encode()).hexdigest()[:16]


def plan_batch(b: BatchConfig, base_lr: Optional[float], world: int,
               multiple: int = 1) -> Tuple[batch.BatchPlan, Optional[str]]:
    """(the split of batch section `b` over `world` ranks, a line saying what it changed or None); the problem
    "batch.global_batch: ..." naming the nearest feasible global batches and their lr when it cannot split."""
    plan, note = batch.split(b.global_batch, b.micro_batch, world, multiple), None
    if plan is None:
        options = batch.nearest(b.global_batch, b.micro_batch, world, multiple)
        said = " or ".join(f"{p.global_batch} (micro {p.micro} x {p.accum} accumulation" +
                           (f", lr {batch.lr_for(base_lr, p.global_batch):.4g})" if base_lr else ")") for p in options)
        if b.global_batch_policy == "exact":
            pairs = f" (a multiple of {multiple})" if multiple > 1 else ""
            raise problem(f"{b.global_batch} images cannot be split exactly over {world} rank(s) with at most "
                          f"{b.micro_batch} per micro batch{pairs}; nearest: {said}; expected one of those, or "
                          f"batch.global_batch_policy: nearest to take the closest", key="batch.global_batch")
        plan = min(options, key=lambda p: (abs(p.global_batch - b.global_batch), p.global_batch))
        note = (f"batch: global_batch_policy nearest: {b.global_batch} images do not split over {world} rank(s); "
                f"training with {plan.describe()}, lr {batch.lr_for(base_lr, plan.global_batch):.4g} (base_lr x "
                f"{plan.global_batch} / 256) instead of {batch.lr_for(base_lr, b.global_batch):.4g}")
    elif plan.micro != b.micro_batch:
        note = f"batch: {plan.describe()} (batch.micro_batch {b.micro_batch} is the most per rank)"
    plan = replace(plan, lr=batch.lr_for(base_lr, plan.global_batch) if base_lr is not None else None)
    if not batch.efficient(plan, b.micro_batch):
        faster = " or ".join(str(p.global_batch) for p in batch.nearest(plan.global_batch, b.micro_batch, world,
                                                                        multiple))
        note = (note or f"batch: {plan.describe()}") + (f"; warning: micro batch {plan.micro} is far below "
                                                        f"{b.micro_batch}: {faster} images would run faster")
    return plan, note


def validate(cls, tree: dict, world_size: Optional[int] = None, source: str = "recipe",
             by_hand: Optional[List[str]] = None):
    """Recipe class `cls` from the plain `tree`, or RecipeError listing every problem (world_size: for the batch
    arithmetic; None = not checked; by_hand: the dotted keys the user set, None = all)."""
    try:
        recipe = cls.model_validate(tree or {}, context={"world_size": world_size})
    except ValidationError as e:
        raise RecipeError(problems_of(e, cls), source) from None
    recipe._by_hand = None if by_hand is None else frozenset(by_hand)
    return recipe


def check(recipe: BaseRecipe, world_size: Optional[int] = None) -> List[str]:
    """The problems of a built recipe for `world_size` (empty = runnable): what the trainer asks before it starts.
    With a world size and no problem, `recipe.plan` is then the split this check computed (from the batch section
    as written, whatever world the recipe was validated for before)."""
    tree = recipe.to_dict()
    if recipe._requested is not None:
        tree["batch"] = dict(recipe._requested)
    try:
        checked = validate(type(recipe), tree, world_size)
    except RecipeError as e:
        return e.problems
    for name in type(recipe).model_fields:  # the validated values (a value set on the recipe may be raw)
        if name != "batch" or world_size:  # without a world size the recipe keeps the split it has
            setattr(recipe, name, getattr(checked, name))
    if world_size:
        recipe._adopt(checked._plan, checked._batch_note)
    return []


# ------------------------------------------------------------------ overrides
def _parse_value(text: str):
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict, overrides: List[str]) -> List[str]:
    """Apply 'a.b.c=value' strings (value parsed as YAML) to the nested dict in place; returns problems."""
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item}: expected dotted.key=value")
            continue
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        node = tree
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                if k in node and node[k] is not None:
                    problems.append(f"--set {path}: {k} is not a mapping")
                    break
                node[k] = {}
            node = node[k]
        else:
            node[keys[-1]] = _parse_value(text)
    return problems


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


# ------------------------------------------------------------------ files
def resolve_path(path: str) -> str:
    """`path` itself when absolute or existing from the cwd; else configs/... or ds_configs/... from the installed
    package or the checkout."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    found = [os.path.join(root, path) for root in (PACKAGE_ROOT, REPO_ROOT) if os.path.exists(os.path.join(root, path))]
    return found[0] if found else os.path.join(REPO_ROOT, path)


def shipped_recipes() -> List[str]:
    """The names of the recipes in configs/ (installed or in the checkout): `--config NAME` finds them."""
    folder = resolve_path("configs")
    return sorted(f[:-len(".yaml")] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []


def recipe_path(config: str) -> str:
    """--config: a YAML path, or the name of a shipped recipe ('mff_vit-b_300e' -> configs/mff_vit-b_300e.yaml)."""
    if not os.path.exists(config) and config in shipped_recipes():
        return resolve_path(os.path.join("configs", config + ".yaml"))
    return resolve_path(config)


def is_shipped(path: str) -> bool:
    """`path` is one of the recipes in configs/ (installed or in the checkout): its values are the project's."""
    found = os.path.realpath(recipe_path(path))
    return any(os.path.dirname(found) == os.path.realpath(os.path.join(root, "configs"))
               for root in (PACKAGE_ROOT, REPO_ROOT))


def leaf_keys(tree: dict, prefix: str = "") -> List[str]:
    """The dotted keys of every value in a nested mapping that is not itself a non-empty mapping."""
    out = []
    for k, v in tree.items():
        out += leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def read_tree(path: Optional[str], overrides: Optional[List[str]] = None) -> Tuple[dict, str, List[str]]:
    """(YAML tree with `--set` overrides applied, source name, the dotted keys set by hand: the overrides', and every
    key of a YAML file that is not a shipped recipe). Shared by every recipe kind."""
    tree: dict = {}
    source = path or "recipe"
    if path is not None:
        try:
            with open(recipe_path(path)) as f:
                tree = yaml.safe_load(f)
        except FileNotFoundError:
            raise RecipeError([f"--config: expected an existing YAML file or the name of a shipped recipe "
                               f"{shipped_recipes()}, got {path!r}"], source) from None
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not text"
            raise RecipeError([f"--config: expected a readable YAML file, got {path!r} ({why})"], source) from None
        except yaml.YAMLError as e:
            raise RecipeError([f"--config: not valid YAML: {e}"], source) from None
        if tree is None:
            raise RecipeError([f"--config: {path!r} is empty; expected a recipe (a mapping, e.g. configs/demo.yaml)"],
                              source)
        if not isinstance(tree, dict):
            raise RecipeError([f"recipe: expected a mapping at the top level, got {type(tree).__name__}"], source)
    by_hand = [] if path is None or is_shipped(path) else leaf_keys(tree)
    problems = apply_overrides(tree, overrides or [])
    if problems:
        raise RecipeError(problems, source)
    return tree, source, by_hand + [item.split("=", 1)[0].strip() for item in overrides or []]


def launcher_world_size() -> int:
    from .distributed import detect
    return detect().world_size


def save_recipe(recipe, path: str) -> None:
    """Atomically write a resolved recipe (anything with to_dict()) as YAML."""
    from mff_ds.common import write_text
    write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
