"""Model configuration (a validated pydantic model) and the named sizes; mae.build_model() builds from them."""
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import AfterValidator, ValidationError, WithJsonSchema, model_validator

from mff_ds.schema import Bool, Int, PosFloat, PosInt, Section, fail, float_, problems_of

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


class ModelConfig(Section):
    img_size: PosInt = 224
    patch_size: PosInt = 16
    in_chans: PosInt = 3
    embed_dim: PosInt = 768
    depth: PosInt = 12
    num_heads: PosInt = 12
    mlp_ratio: PosFloat = 4.0
    decoder_embed_dim: PosInt = 512
    decoder_depth: PosInt = 8
    decoder_num_heads: PosInt = 16
    decoder_mlp_ratio: PosFloat = 4.0
    mask_ratio: float_(ge=0, lt=1) = 0.75
    out_indices: List[Int] = [0, 2, 4, 6, 8, 11]  # one entry = plain MAE
    norm_pix_loss: Bool = True
    kernels: Literal[KERNEL_IMPLS] = "torch"  # what every shipped recipe uses; Triton is not yet proven faster
    grad_checkpointing: Bool = False

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

    @model_validator(mode="after")
    def _consistent(self):
        p = []
        if self.img_size % self.patch_size:
            p.append(("img_size", f"expected a multiple of patch_size {self.patch_size}, got {self.img_size}"))
        elif self.len_keep < 1:
            p.append(("mask_ratio", f"keeps no patch of {self.num_patches} (ratio {self.mask_ratio})"))
        for dim, heads, what in ((self.embed_dim, self.num_heads, ""),
                                 (self.decoder_embed_dim, self.decoder_num_heads, "decoder_")):
            if dim % heads:
                p.append((f"{what}embed_dim", f"expected a multiple of {what}num_heads {heads}, got {dim}"))
            if dim % 4:
                p.append((f"{what}embed_dim", f"expected a multiple of 4 (2-D sin-cos positions), got {dim}"))
        bad = [i for i in self.out_indices if not -self.depth <= i < self.depth]
        if not self.out_indices:
            p.append(("out_indices", f"expected a non-empty list of block indices, got {self.out_indices!r}"))
        elif bad:
            p.append(("out_indices", f"expected indices in [{-self.depth}, {self.depth - 1}] for depth {self.depth}, "
                                     f"got {bad}"))
        elif len(set(self.levels)) != len(self.levels):
            p.append(("out_indices", f"expected distinct blocks, got {self.out_indices}"))
        fail(p)
        return self


class ModelSection(ModelConfig):
    """A recipe's `model:` section: an architecture name (its sizes) and/or ModelConfig fields over them."""
    arch: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _named_sizes(cls, spec: Any) -> Any:
        if isinstance(spec, dict) and spec.get("arch") is not None:
            named = _named_config(spec["arch"])
            if named is None:
                fail([("arch", f"unknown architecture {spec['arch']!r}; expected one of {arch_names()} or a dict of "
                               f"ModelConfig fields")])
            spec = {**named.to_dict(), **spec}
        return spec

    def config(self) -> ModelConfig:
        return ModelConfig.model_validate(self.model_dump(exclude={"arch"}))


def _valid_section(spec: Dict[str, Any]) -> Dict[str, Any]:
    ModelSection.model_validate(spec)
    return spec


# The type of a recipe's `model:` field: checked as a ModelSection, kept as written (recipes save it and hash
# the resolved ModelConfig)
ModelSpec = Annotated[Dict[str, Any], AfterValidator(_valid_section), WithJsonSchema(ModelSection.model_json_schema())]


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
    """-> (the config, []) or (None, every problem found, each naming its `model.` key)."""
    if isinstance(name_or_config, ModelConfig):
        spec = name_or_config.to_dict()
    elif isinstance(name_or_config, (str, dict)):
        spec = {"arch": name_or_config} if isinstance(name_or_config, str) else dict(name_or_config)
    elif name_or_config is None:
        spec = {}
    else:
        return None, [f"model: expected an arch name, a dict or a ModelConfig, got {type(name_or_config).__name__}"]
    try:
        return ModelSection.model_validate({**spec, **overrides}).config(), []
    except ValidationError as e:
        return None, problems_of(e, ModelSection, prefix="model.")


def resolve_config(name_or_config: Union[str, dict, ModelConfig, None] = None, **overrides) -> ModelConfig:
    """config_problems() that raises ValueError listing every problem."""
    cfg, problems = config_problems(name_or_config, **overrides)
    if problems:
        raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
    return cfg
