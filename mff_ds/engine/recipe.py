"""What every recipe kind shares: the common sections (batch, optim, schedule, deepspeed, checkpoint, logging),
YAML + `--set a.b=c` reading, path resolution and the resume comparison. The pretraining recipe is
mff_ds.pretrain.recipe, the fine-tune / linear-probe one mff_ds.eval.recipe."""
import copy
import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# configs/ and ds_configs/ sit at the repo root in a checkout; an installed package carries them as package data
# in mff_ds/configs and mff_ds/ds_configs (pyproject.toml maps the folders)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecipeError(ValueError):
    """A recipe that cannot run; `.problems` lists every problem as 'key: expected ..., got ...'."""

    def __init__(self, problems: List[str], source: str = "recipe"):
        self.problems = list(problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


@dataclass
class BatchConfig:
    global_batch: int = 4096          # images per optimizer step, all ranks together
    micro_batch: int = 512            # images per forward on one device; accumulation = global / (micro * world)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4           # lr = base_lr * global_batch / 256
    min_lr: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    decay_fusion_logits: bool = True  # the reference decays the raw fusion logits
    grad_clip: float = 0.0            # 0 = no clipping (the reference)


@dataclass
class ScheduleConfig:
    epochs: int = 300
    warmup_epochs: float = 40.0
    warmup_start_factor: float = 1e-4  # mmengine LinearLR start factor: 1e-4 (300e) / 1e-9 (800e)


# torch.compile's modes; the CUDA-graph ones ("reduce-overhead", "max-autotune") are left out: DeepSpeed's
# gradient hooks and the per-step lr change run outside the graph and would force re-recording.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"   # relative to the repo root or absolute
    zero_stage: Optional[int] = None        # override zero_optimization.stage
    load_universal: bool = False            # resume from a ds_to_universal checkpoint (other world size)
    compile: bool = False                   # torch.compile the model through the engine (engine.compile())
    compile_mode: str = "default"           # torch.compile mode: default | max-autotune-no-cudagraphs | ...
    overrides: Dict[str, Any] = field(default_factory=dict)  # deep-merged into the DeepSpeed config


@dataclass
class CheckpointConfig:
    every_steps: int = 1000           # 0 = only at the end
    keep_last: int = 3
    export: bool = True               # consolidated fp32 model + timm encoder at the end


@dataclass
class LoggingConfig:
    every_steps: int = 50
    image_every_steps: int = 1000     # reconstruction grid (TensorBoard + PNG); 0 = off
    num_images: int = 4
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: Optional[float] = None  # per device, for MFU; None = from the device name (CUDA only)


class RecipeMethods:
    """What every recipe kind (pretraining, eval) derives the same way from its batch/optim sections."""

    def to_dict(self) -> dict:
        return _to_plain(self)

    def grad_accum(self, world_size: int) -> int:
        return self.batch.global_batch // (self.batch.micro_batch * world_size)

    def lr(self) -> float:
        return self.optim.base_lr * self.batch.global_batch / 256

    def compat_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.compat_dict(), sort_keys=True).encode()).hexdigest()[:16]


def diff_settings(old: dict, new: dict, prefix: str = "", only_new: bool = False) -> List[str]:
    """'key: checkpoint OLD -> recipe NEW' for every nested key that differs (only_new: keys of `new` only)."""
    out = []
    for k in sorted(set(new) if only_new else set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{k}.", only_new)
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} -> recipe {b!r}")
    return out


def resume_differences(meta: dict, recipe) -> Tuple[List[str], List[str]]:
    """(incompatible, compatible) differences between a checkpoint's completion marker and the recipe resuming it.
    Keys the recipe no longer treats as binding (e.g. data.pin_memory in older markers) are not held against it."""
    if "compat" in meta:
        incompatible = diff_settings(meta["compat"], recipe.compat_dict(), only_new=True)
    else:
        incompatible = [] if meta.get("recipe_hash") in (None, recipe.compat_hash()) else ["(recipe hash differs)"]
    compatible = [] if incompatible or "recipe" not in meta else diff_settings(meta["recipe"], recipe.to_dict())
    return incompatible, compatible


# ------------------------------------------------------------------ plain <-> dataclass
def _to_plain(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(t)[0])}" if typing.get_args(t) else "list"
    if origin in (dict, Dict):
        return "mapping"
    if dataclasses.is_dataclass(t):
        return "mapping"
    return getattr(t, "__name__", str(t)).replace("NoneType", "null")


def _coerce(value, t, key: str, problems: List[str]):
    """value checked/converted to type t; on failure append 'key: expected T, got V' and return None."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    bad = lambda: problems.append(f"{key}: expected {_type_name(t)}, got {value!r} ({type(value).__name__})")
    if t is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: List[str] = []
        out = _coerce(value, inner[0], key, sub) if len(inner) == 1 else value
        if sub:
            bad()
        return out
    if origin is Literal:
        if value not in args:
            bad()
        return value
    if dataclasses.is_dataclass(t):
        return _build(t, value, key, problems)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            bad()
            return None
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict) or t is dict:
        if not isinstance(value, dict):
            bad()
            return None
        return dict(value)
    if t is bool:
        if not isinstance(value, bool):
            bad()
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 4.096e3 from YAML
            bad()
        return value
    if t is float:
        if isinstance(value, bool):
            bad()
            return value
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        bad()
        return value
    if t is str:
        if not isinstance(value, str):
            bad()
        return value
    return value


def _build(cls, data, key: str, problems: List[str]):
    """Build dataclass `cls` from mapping `data`, listing unknown keys and type errors under `key`."""
    prefix = f"{key}." if key else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{key or 'recipe'}: expected a mapping, got {data!r} ({type(data).__name__})")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            problems.append(f"{prefix}{k}: unknown key; expected one of {names}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            n_before = len(problems)
            v = _coerce(data[f.name], hints[f.name], prefix + f.name, problems)
            if len(problems) == n_before or dataclasses.is_dataclass(hints[f.name]):  # keep partly-valid sections
                kwargs[f.name] = v
    return cls(**kwargs)


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


def schedule_and_deepspeed_problems(s, d) -> List[str]:
    """Checks shared by every recipe kind: the `schedule:` and `deepspeed:` sections."""
    p = []
    if s.epochs <= 0:
        p.append(f"schedule.epochs: expected a positive integer, got {s.epochs}")
    if not 0 <= s.warmup_epochs <= max(s.epochs, 0):
        p.append(f"schedule.warmup_epochs: expected in [0, epochs={s.epochs}], got {s.warmup_epochs}")
    if not 0 < s.warmup_start_factor <= 1:
        p.append(f"schedule.warmup_start_factor: expected in (0, 1], got {s.warmup_start_factor}")
    if not os.path.isfile(resolve_path(d.config)):
        p.append(f"deepspeed.config: expected an existing JSON file, got {d.config!r}")
    if d.zero_stage is not None and d.zero_stage not in (0, 1, 2):
        p.append(f"deepspeed.zero_stage: expected 0, 1 or 2, got {d.zero_stage}")
    if d.compile_mode not in COMPILE_MODES:
        p.append(f"deepspeed.compile_mode: expected one of {list(COMPILE_MODES)}, got {d.compile_mode!r}")
    return p


def read_tree(path: Optional[str], overrides: Optional[List[str]] = None) -> Tuple[dict, str]:
    """(YAML tree with `--set` overrides applied, source name). Shared by every recipe kind."""
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
    problems = apply_overrides(tree, overrides or [])
    if problems:
        raise RecipeError(problems, source)
    return tree, source


def launcher_world_size() -> int:
    from .distributed import detect
    return detect().world_size


def save_recipe(recipe, path: str) -> None:
    """Atomically write a resolved recipe (anything with to_dict()) as YAML."""
    # imported here: mff_ds.common imports torch, and this module must not, so that launch/pretrain.py installs
    # its signal handlers before the seconds-long torch import
    from mff_ds.common import write_text
    write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
