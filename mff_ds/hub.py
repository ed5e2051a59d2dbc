"""Folders that other libraries load from: timm `local-dir:` / Hub folders and transformers ViTMAE folders.

- `to_timm_dir(state, cfg, out_dir)`: `config.json` (architecture, model_args, pretrained_cfg) + `model.safetensors`,
  written by timm's own `save_for_hf`, so `timm.create_model("local-dir:OUT_DIR", pretrained=True)` (or the same
  folder pushed to the Hub, `hf-hub:org/name`) needs no other argument. The encoder only, as `to_timm` gives it.
- `to_hf(model, out_dir)` / `from_hf(folder)`: transformers ViTMAE (`config.json` + `model.safetensors`, the Hub's
  key layout, which transformers 4.x and 5.x read). ViTMAE has no place for MFF's fusion, so an MFF model's
  `fusion_proj.*` and `fusion_logits` go to `mff_fusion.safetensors` in the same folder, under our names, with our
  model config (`model_config`, for `out_indices`) in its metadata. transformers ignores that file and sees a plain
  ViTMAE (its encoder is MFF's encoder); `from_hf` reads all three files and restores the MFF model exactly.

Writes are atomic per file: everything goes to a temporary folder beside OUT_DIR, then each file is moved in with
os.replace, config.json last. transformers is the optional extra `mff-ds[hf]`.
"""
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from mff_ds.common import MissingFileError, UserError

from . import convert
from .models import ModelConfig, build_model
from .models.vit import LayerNorm

WEIGHTS, CONFIG, FUSION = "model.safetensors", "config.json", "mff_fusion.safetensors"
FUSION_FORMAT = "mff_ds.hf_fusion.v1"
LN_EPS = LayerNorm.keywords["eps"]  # ours everywhere (MAE, mmpretrain); ViTMAE's default is 1e-12
FALLBACK_TIMM_ARCH = "vit_base_patch16_224"  # any plain-ViT builder: the folder's model_args give every size


def _write_dir(out_dir, write, stale=()) -> Path:
    """write(tmp_folder) fills a temporary folder beside out_dir; its files then replace those in out_dir
    (config.json last); the `stale` names are removed from out_dir first."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: expected a folder to write into (new or existing), got a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        out.mkdir(exist_ok=True)
        for name in stale:
            (out / name).unlink(missing_ok=True)
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == CONFIG):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------ timm
def timm_data_config(cfg: ModelConfig, crop_pct=None, interpolation=None) -> dict:
    """The preprocessing of our recipes: the pretraining normalisation (data.IMAGENET_MEAN/STD, 0-255 there)
    and the fine-tune recipes' validation crop (eval.recipe.AugConfig: val_crop_pct, val_interpolation)."""
    from .data import IMAGENET_MEAN, IMAGENET_STD
    from .eval.recipe import AugConfig
    aug = AugConfig()
    return dict(input_size=(cfg.in_chans, cfg.img_size, cfg.img_size),
                mean=tuple(round(v / 255, 6) for v in IMAGENET_MEAN), std=tuple(round(v / 255, 6) for v in IMAGENET_STD),
                crop_pct=aug.val_crop_pct if crop_pct is None else crop_pct,
                interpolation=aug.val_interpolation if interpolation is None else interpolation)


def to_timm_dir(state, cfg: ModelConfig, out_dir, crop_pct=None, interpolation=None) -> Path:
    """Our model (or its state dict) -> a timm folder: timm.create_model("local-dir:OUT_DIR", pretrained=True)."""
    import timm
    from timm.models import save_for_hf
    try:
        arch = convert.timm_name(cfg)
    except ValueError:
        arch = FALLBACK_TIMM_ARCH
    vit_args = {k: getattr(cfg, k) for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                             "mlp_ratio")}
    # built on the meta device and given our tensors: no init cost, and a strict load checks every name and shape
    vit = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="token", device="meta", **vit_args)
    vit.load_state_dict(convert.to_timm(state), strict=True, assign=True)
    # our own pretrained_cfg, not the builder's (whose tag and license describe timm's ImageNet weights)
    vit.pretrained_cfg = dict(architecture=arch, input_size=(cfg.in_chans, cfg.img_size, cfg.img_size),
                              fixed_input_size=True, num_classes=0, first_conv="patch_embed.proj", classifier="head")
    data = timm_data_config(cfg, crop_pct, interpolation)
    return _write_dir(out_dir, lambda d: save_for_hf(vit, d, safe_serialization=True, data_config=data))


# ------------------------------------------------------------------ transformers ViTMAE
def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"transformers ViTMAE folders need transformers: pip install 'mff-ds[hf]' ({e})") from None
    return transformers


def hf_config(cfg: ModelConfig):
    """Our ModelConfig -> transformers ViTMAEConfig (exact GELU, qkv bias and LayerNorm eps as ours)."""
    return _transformers().ViTMAEConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", layer_norm_eps=LN_EPS,
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans, qkv_bias=True,
        decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.decoder_mlp_ratio),
        mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss, architectures=["ViTMAEForPreTraining"])


def to_hf(model, out_dir) -> Path:
    """Our MAE / MFF model -> a transformers ViTMAEForPreTraining folder (+ mff_fusion.safetensors for MFF)."""
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fusion = {k: sd.pop(k) for k in list(sd) if k.startswith("fusion_")}
    tensors = {k: v.contiguous().clone() for k, v in convert.to_hf_state(sd).items()}
    config = hf_config(model.cfg)

    def write(d):
        config.save_pretrained(d)
        save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})  # transformers wants this metadata
        if fusion:
            convert.save_file(fusion, d / FUSION, {"format": FUSION_FORMAT, "model_config": model.cfg.to_dict()})
    return _write_dir(out_dir, write, stale=() if fusion else (FUSION,))


def _read_hf_config(folder: Path) -> dict:
    what = "a transformers ViTMAE folder (config.json + model.safetensors)"
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: expected {what}, got no such folder")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise MissingFileError(f"{folder}: expected {what}, but {name} is missing")
    try:
        hf = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / CONFIG}: expected JSON, got a parse error ({e})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "vit_mae":
        given = (f"a timm folder (architecture {hf['architecture']!r})" if isinstance(hf, dict) and "architecture" in hf
                 else f"model_type {hf.get('model_type')!r}" if isinstance(hf, dict) else type(hf).__name__)
        raise UserError(f"{folder}: expected {what} with model_type 'vit_mae' in config.json, got {given}")
    return hf


def from_hf(folder, **overrides):
    """A transformers ViTMAE folder (ForPreTraining; a ViTMAEModel folder gives a fresh decoder, with a warning)
    -> our model; with mff_fusion.safetensors beside it, the MFF model it came from."""
    from safetensors.torch import load_file
    folder = Path(folder)
    _read_hf_config(folder)
    c = _transformers().ViTMAEConfig.from_pretrained(str(folder))  # transformers' defaults for absent fields
    if c.hidden_act != "gelu" or not c.qkv_bias:
        raise UserError(f"{folder}: expected hidden_act 'gelu' and qkv_bias true (a ViT as ours), got "
                         f"{c.hidden_act!r} and {c.qkv_bias}")
    if c.layer_norm_eps != LN_EPS:
        warnings.warn(f"{folder}: layer_norm_eps is {c.layer_norm_eps}; ours is {LN_EPS} (as MAE and mmpretrain), "
                      f"so outputs differ slightly from the transformers model's")
    size = c.image_size if isinstance(c.image_size, int) else tuple(c.image_size)
    if not isinstance(size, int) and len(set(size)) != 1:
        raise UserError(f"{folder}: expected a square image_size, got {c.image_size}")
    tensors = load_file(str(folder / WEIGHTS))
    encoder_only = not any(k.startswith("decoder.") for k in tensors)
    if encoder_only:  # a ViTMAEModel folder: no "vit." prefix, no decoder
        tensors = {k if k.startswith("vit.") else f"vit.{k}": v for k, v in tensors.items()}
        warnings.warn(f"{folder}: encoder-only ViTMAE folder; the decoder is freshly initialised")
    sd = convert.from_hf_state(tensors)
    cfg = dict(img_size=size if isinstance(size, int) else size[0], patch_size=c.patch_size, in_chans=c.num_channels,
               embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
               mlp_ratio=c.intermediate_size / c.hidden_size, decoder_embed_dim=c.decoder_hidden_size,
               decoder_depth=c.decoder_num_hidden_layers, decoder_num_heads=c.decoder_num_attention_heads,
               decoder_mlp_ratio=c.decoder_intermediate_size / c.decoder_hidden_size, mask_ratio=c.mask_ratio,
               norm_pix_loss=c.norm_pix_loss, out_indices=[c.num_hidden_layers - 1])
    if (folder / FUSION).is_file():
        fusion, meta = convert.read_file(folder / FUSION)
        if meta.get("format") != FUSION_FORMAT:
            raise UserError(f"{folder / FUSION}: expected an mff_ds fusion file (format {FUSION_FORMAT!r}), "
                             f"got format {meta.get('format')!r}")
        cfg["out_indices"] = meta["model_config"]["out_indices"]
        sd.update(fusion)
    model = build_model({**cfg, **overrides})
    return convert.load_state_dict_checked(model, sd, f"transformers folder {folder}", allow_missing_decoder=encoder_only)
