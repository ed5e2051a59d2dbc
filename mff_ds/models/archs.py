"""Model configuration, the named sizes and build_model()."""
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Tuple, Union

# name: (embed_dim, depth, num_heads); MLP ratio 4 everywhere.
SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
PATCHES = (14, 16)
KERNEL_IMPLS = ("auto", "triton", "torch")


def default_out_indices(depth: int, levels: int = 6) -> List[int]:
    """The reference's ViT-B set [0, 2, 4, 6, 8, 11], generalised: levels-1 evenly spaced blocks + the last."""
    if depth < levels:
        return list(range(depth))
    return [i * depth // levels for i in range(levels - 1)] + [depth - 1]


@dataclass
class ModelConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    out_indices: List[int] = field(default_factory=lambda: [0, 2, 4, 6, 8, 11])  # one entry = plain MAE
    norm_pix_loss: bool = True
    kernels: str = "auto"
    grad_checkpointing: bool = False

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def len_keep(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def levels(self) -> List[int]:
        """out_indices with negative entries resolved (depth + idx), in the given order."""
        return [i + self.depth if i < 0 else i for i in self.out_indices]

    def problems(self) -> List[str]:
        p = []
        for f in fields(self):
            v = getattr(self, f.name)
            want = {int: int, float: (int, float), bool: bool, str: str}.get(f.type)
            if want and (not isinstance(v, want) or (f.type is not bool and isinstance(v, bool))):
                p.append(f"model.{f.name}: expected {f.type.__name__}, got {v!r}")
        if p:
            return p
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            if getattr(self, name) <= 0:
                p.append(f"model.{name}: expected a positive integer, got {getattr(self, name)}")
        if p:
            return p
        if self.img_size % self.patch_size:
            p.append(f"model.img_size: expected a multiple of patch_size {self.patch_size}, got {self.img_size}")
        for dim, heads, what in ((self.embed_dim, self.num_heads, ""), (self.decoder_embed_dim, self.decoder_num_heads, "decoder_")):
            if dim % heads:
                p.append(f"model.{what}embed_dim: expected a multiple of {what}num_heads {heads}, got {dim}")
            if dim % 4:
                p.append(f"model.{what}embed_dim: expected a multiple of 4 (2-D sin-cos positions), got {dim}")
        if not 0.0 <= self.mask_ratio < 1.0:
            p.append(f"model.mask_ratio: expected a value in [0, 1), got {self.mask_ratio}")
        elif self.img_size % self.patch_size == 0 and self.len_keep < 1:
            p.append(f"model.mask_ratio: keeps no patch of {self.num_patches} (ratio {self.mask_ratio})")
        if not isinstance(self.out_indices, list) or not self.out_indices or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.out_indices):
            p.append(f"model.out_indices: expected a non-empty list of block indices, got {self.out_indices!r}")
        else:
            bad = [i for i in self.out_indices if not -self.depth <= i < self.depth]
            if bad:
                p.append(f"model.out_indices: expected indices in [{-self.depth}, {self.depth - 1}] for depth {self.depth}, got {bad}")
            elif len(set(self.levels)) != len(self.levels):
                p.append(f"model.out_indices: expected distinct blocks, got {self.out_indices}")
        if self.kernels not in KERNEL_IMPLS:
            p.append(f"model.kernels: expected one of {list(KERNEL_IMPLS)}, got {self.kernels!r}")
        return p

    def to_dict(self) -> dict:
        return asdict(self)


def arch_names() -> List[str]:
    return [f"{kind}_vit_{size}_patch{p}" for kind in ("mff", "mae") for size in SIZES for p in PATCHES]


def _named_config(name) -> Optional[ModelConfig]:
    """'mff_vit_base_patch16' / 'mae_vit_large_patch14' -> ModelConfig; None for any other name."""
    parts = name.split("_") if isinstance(name, str) else []
    ok = (len(parts) == 4 and parts[0] in ("mff", "mae") and parts[1] == "vit" and parts[2] in SIZES
          and parts[3] in {f"patch{p}" for p in PATCHES})
    if not ok:
        return None
    dim, depth, heads = SIZES[parts[2]]
    out = default_out_indices(depth) if parts[0] == "mff" else [depth - 1]
    return ModelConfig(patch_size=int(parts[3][5:]), embed_dim=dim, depth=depth, num_heads=heads, out_indices=out)


def config_problems(name_or_config: Union[str, dict, ModelConfig, None] = None,
                    **overrides) -> Tuple[Optional[ModelConfig], List[str]]:
    """-> (the config, []) or (None, every problem found, each naming its `model.` key): the recipe check lists
    them with the rest of the recipe's problems, resolve_config raises them."""
    if isinstance(name_or_config, ModelConfig):
        base = asdict(name_or_config)
    elif isinstance(name_or_config, (str, dict)):
        spec = {"arch": name_or_config} if isinstance(name_or_config, str) else dict(name_or_config)
        arch = spec.pop("arch", None)
        named = _named_config(arch) if arch else None
        if arch and named is None:
            return None, [f"model.arch: unknown architecture {arch!r}; expected one of {arch_names()} or a dict of "
                          f"ModelConfig fields"]
        base = {**(asdict(named) if named else {}), **spec}
    elif name_or_config is None:
        base = {}
    else:
        return None, [f"model: expected an arch name, a dict or a ModelConfig, got {type(name_or_config).__name__}"]
    base.update(overrides)
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(base) - known)
    if unknown:
        return None, [f"model: unknown model option(s) {unknown}; expected some of {sorted(known)}"]
    if "out_indices" in base and isinstance(base["out_indices"], tuple):
        base["out_indices"] = list(base["out_indices"])
    cfg = ModelConfig(**base)
    problems = cfg.problems()
    return (None, problems) if problems else (cfg, [])


def resolve_config(name_or_config: Union[str, dict, ModelConfig, None] = None, **overrides) -> ModelConfig:
    """config_problems() that raises ValueError listing every problem."""
    cfg, problems = config_problems(name_or_config, **overrides)
    if problems:
        raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
    return cfg


def build_model(name_or_config: Union[str, dict, ModelConfig, None] = "mff_vit_base_patch16", **overrides):
    """Build a MaskedAutoencoder (MFF when out_indices has several entries, plain MAE with one)."""
    from .mae import MaskedAutoencoder
    return MaskedAutoencoder(resolve_config(name_or_config, **overrides))
