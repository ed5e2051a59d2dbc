"""Classifiers on a pretrained encoder, as timm VisionTransformers (reference sections 1.7, 3.2, 3.3, 4.3).

- `load_encoder(path, fmt)`: our model files / engine exports, mmpretrain or official MAE pretraining
  checkpoints, or a zoo name (mff_ds.zoo) -> (timm encoder state dict, ModelConfig). The MFF fusion is
  dropped (it is pretraining-only).
- fine-tune: `build_finetune_model` = ViT, global average pool of the patch tokens, a fresh `fc_norm`
  (the pretrained final norm is dropped), drop path, new head (trunc-normal std 2e-5).
  `finetune_param_groups` = timm's layer-wise lr decay groups (`lr_scale`, honoured by engine.schedule.LrSchedule).
- linear probe: `LinearProbe` = frozen ViT (cls token through the pretrained final norm, always in eval mode)
  -> BatchNorm1d(affine=False, eps 1e-6) -> Linear (trunc-normal std 0.01).
- classifier files: `save_classifier` / `load_classifier` (ours), plus mmpretrain and official MAE
  fine-tuned / linear-probe layouts through `classifier_state_from_external`.
"""
import re
from typing import List, Optional, Tuple

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from mff_ds import convert, zoo
from mff_ds.common import UserError
from mff_ds.models import ModelConfig, ModelSection, build_model

CLASSIFIER_FORMAT = "mff_ds.classifier.v1"
VIT_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


# ------------------------------------------------------------------ pretrained encoders
def load_encoder(path: Optional[str], fmt: str = "auto", model: Optional[dict] = None) -> Tuple[dict, ModelConfig]:
    """(timm encoder state dict, ModelConfig). path None: a randomly initialised encoder built from `model`
    (an arch name under 'arch' and/or ModelConfig fields), with the pretraining init scheme. With a checkpoint,
    only model.num_heads is used (for mmpretrain / MAE files, whose heads the weights do not determine)."""
    model, path = dict(model or {}), zoo.resolve(path)
    if path is None:
        m = build_model(model)
    else:
        fmt = convert.detect_format(path) if fmt == "auto" else fmt
        # our files carry their config; the others cannot tell the number of heads (default embed_dim // 64)
        hints = {"num_heads": model["num_heads"]} if "num_heads" in model and fmt != "mff_ds" else {}
        m = convert.load_any(path, fmt, **hints)
    return convert.to_timm(m), m.cfg


def checkpoint_wins(model: dict, cfg: ModelConfig) -> List[str]:
    """The keys where a recipe's `model:` section (an arch and/or fields) says another encoder than the checkpoint
    `cfg` was trained as, one line each: the weights fix the architecture, so the checkpoint's is trained."""
    # an arch states all its sizes; without one, only the fields written down are claims (num_heads alone is a
    # hint for files that do not record it)
    keys = VIT_KEYS if model.get("arch") else [k for k in VIT_KEYS if k in model]
    if not keys:
        return []
    said = ModelSection.model_validate(model).config()
    return [f"model.{k}: the recipe says {getattr(said, k)!r}, the checkpoint has {getattr(cfg, k)!r}; training the "
            f"checkpoint's" for k in keys if getattr(said, k) != getattr(cfg, k)]


def vit_kwargs(cfg) -> dict:
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return {k: d[k] for k in VIT_KEYS}


def _vit(vit: dict, **kw) -> VisionTransformer:
    return VisionTransformer(**vit, qkv_bias=True, class_token=True, **kw)


def _resample_pos(sd: dict, vit: dict, src_img: int) -> dict:
    if vit["img_size"] == src_img:
        return sd
    grid = vit["img_size"] // vit["patch_size"]
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (grid, grid), num_prefix_tokens=1)
    return sd


# ------------------------------------------------------------------ fine-tune
def build_finetune_model(encoder_sd: dict, cfg: ModelConfig, num_classes: int, drop_path: float = 0.1,
                         head_init_std: float = 2e-5, img_size: Optional[int] = None) -> VisionTransformer:
    """ViT with global average pooling + fresh fc_norm; the pretrained final norm is dropped (reference 1.7)."""
    vit = dict(vit_kwargs(cfg), img_size=img_size or cfg.img_size)
    model = _vit(vit, num_classes=num_classes, global_pool="avg", drop_path_rate=drop_path)
    sd = _resample_pos({k: v for k, v in encoder_sd.items() if not k.startswith("norm.")}, vit, cfg.img_size)
    res = model.load_state_dict(sd, strict=False)
    missing = sorted(set(res.missing_keys) - {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"})
    if missing or res.unexpected_keys:
        raise UserError(f"encoder does not fit the fine-tune ViT: missing {missing}, unexpected {res.unexpected_keys}")
    trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    return model


def finetune_param_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list:
    """timm's layer-decay groups: depth 0 = patch embed / cls / pos, block i = i+1, fc_norm and head last;
    scale = layer_decay^(last - depth). No weight decay on 1-D params, biases, cls_token and pos_embed."""
    from timm.optim._param_groups import param_groups_layer_decay
    return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                    no_weight_decay_list=model.no_weight_decay())


# ------------------------------------------------------------------ linear probe
class LinearProbe(nn.Module):
    """Frozen ViT (cls token, pretrained final norm) -> BatchNorm1d(affine=False) -> Linear."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, head_init_std: float = 0.01):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        C = encoder.embed_dim
        self.bn = nn.BatchNorm1d(C, affine=False, eps=1e-6)
        self.head = nn.Linear(C, num_classes)
        trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        self.autocast_dtype: Optional[torch.dtype] = None   # e.g. bf16 for the frozen encoder on CUDA

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen stages stay in eval mode (no drop path)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32,
                                             enabled=self.autocast_dtype is not None):
            f = self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        return f.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.features(x)))


def build_linprobe_model(encoder_sd: dict, cfg: ModelConfig, num_classes: int, head_init_std: float = 0.01,
                         img_size: Optional[int] = None) -> LinearProbe:
    vit = dict(vit_kwargs(cfg), img_size=img_size or cfg.img_size)
    enc = _vit(vit, num_classes=0, global_pool="token")
    enc.load_state_dict(_resample_pos(encoder_sd, vit, cfg.img_size), strict=True)
    return LinearProbe(enc, num_classes, head_init_std)


# ------------------------------------------------------------------ classifier files
def build_classifier(task: str, vit: dict, num_classes: int) -> nn.Module:
    """An empty classifier of the given layout (weights to be loaded)."""
    if task == "finetune":
        return _vit(vit, num_classes=num_classes, global_pool="avg")
    if task == "linprobe":
        return LinearProbe(_vit(vit, num_classes=0, global_pool="token"), num_classes)
    raise UserError(f"task: expected 'finetune' or 'linprobe', got {task!r}")


def save_classifier(state_dict: dict, path, task: str, vit: dict, num_classes: int, extra: Optional[dict] = None):
    """Atomic safetensors file: the classifier's fp32 state dict + what is needed to rebuild it."""
    meta = {"format": CLASSIFIER_FORMAT, "task": task, "vit": vit, "num_classes": num_classes, **(extra or {})}
    convert.save_file({k: v.detach().float().cpu() for k, v in state_dict.items()}, path, meta)


_MM_CLS = [(r"^backbone\.ln2\.", "fc_norm."), (r"^head\.fc\.", "head."), (r"^head\.layers\.head\.", "head."),
           (r"^neck\.bn\.", "bn.")]


def classifier_state_from_external(sd: dict) -> Tuple[str, dict]:
    """mmpretrain (fine-tuned / linear) or official MAE (fine-tuned / linprobe) classifier -> (task, our keys)."""
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in sd):
        out, enc = {}, {}
        for k, v in sd.items():
            for pat, rep in _MM_CLS:
                if re.match(pat, k):
                    out[re.sub(pat, rep, k)] = v
                    break
            else:
                if k.startswith("backbone."):
                    enc[k] = v
        out.update(convert.from_mmpretrain(enc))
    else:
        out = dict(sd)
        for k in [k for k in out if k.startswith("head.0.")]:  # MAE linprobe: head = Sequential(BN, Linear)
            out["bn." + k[len("head.0."):]] = out.pop(k)
        for k in [k for k in out if k.startswith("head.1.")]:
            out["head." + k[len("head.1."):]] = out.pop(k)
    if "bn.running_mean" in out:
        return "linprobe", {(k if k.startswith(("bn.", "head.")) else "encoder." + k): v for k, v in out.items()}
    if "fc_norm.weight" in out:
        return "finetune", out
    raise UserError("classifier checkpoint: expected fc_norm.* (fine-tuned, global pool) or a BatchNorm before the "
                     f"head (linear probe), got keys like {sorted(out)[:6]}")


def _vit_from_state(sd: dict, prefix: str = "") -> dict:
    cfg = convert.infer_config({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return {k: cfg[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "mlp_ratio")}


def load_classifier(path, num_heads: Optional[int] = None) -> Tuple[nn.Module, dict]:
    """A classifier ready for evaluation, and its metadata. Our files carry their layout; external ones
    (mmpretrain / official MAE) are inferred from the keys, num_heads defaulting to embed_dim // 64."""
    obj, meta = convert.read_file(zoo.resolve(path))
    if meta.get("format") == CLASSIFIER_FORMAT:
        task, vit, nc, sd = meta["task"], meta["vit"], int(meta["num_classes"]), obj
    else:
        task, sd = classifier_state_from_external(obj.get("state_dict", obj.get("model", obj)))
        vit = _vit_from_state(sd, "encoder." if task == "linprobe" else "")
        vit["num_heads"] = num_heads or max(1, vit["embed_dim"] // 64)
        nc = sd["head.weight"].shape[0]
        meta = {"task": task, "vit": vit, "num_classes": nc}
    if num_heads:
        vit["num_heads"] = num_heads
    model = build_classifier(task, vit, nc)
    convert.load_state_dict_checked(model, sd, str(path))
    return model, meta
