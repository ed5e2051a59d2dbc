"""Checkpoint interop: this project's model files, mmpretrain MFF/MAE, official MAE, timm, safetensors.

Our parameter names are the official MAE / timm names (patch_embed.proj, blocks.i.norm1, ..., decoder_*),
plus the MFF fusion: fusion_proj.j (mmpretrain backbone.proj_layers.j) and fusion_logits (K,)
(mmpretrain backbone.proj_weights, (K,1,1,1)). `mff_ds.convert` gives every name of this module; the command line
(`python -m mff_ds.convert`, `mff-ds convert`) is __main__.py.

Files ending in .safetensors are written/read with safetensors, anything else with torch.save.
"""
import ast
import json
import re
import warnings
from pathlib import Path

import torch

from mff_ds.common import MissingFileError, UserError, atomic_write
from mff_ds.models import ModelConfig, build_model
from mff_ds.models.archs import default_out_indices

FORMAT = "mff_ds.model.v1"

# A layout is two lists of (our name, their name) pairs. In the first, an entry ending in "." renames a prefix and
# any other a whole name; first match wins, in both directions. Inside encoder and decoder blocks the second list
# then applies as substring replacements, in its order. A new layout is one more such pair of lists.
_MM_NAMES = [
    ("patch_embed.proj.", "backbone.patch_embed.projection."), ("cls_token", "backbone.cls_token"),
    ("pos_embed", "backbone.pos_embed"), ("blocks.", "backbone.layers."), ("norm.", "backbone.ln1."),
    ("fusion_proj.", "backbone.proj_layers."), ("fusion_logits", "backbone.proj_weights"),
    ("decoder_norm.", "neck.ln1."), ("decoder_embed.", "neck.decoder_embed."), ("decoder_pred.", "neck.decoder_pred."),
    ("decoder_blocks.", "neck.decoder_blocks."), ("mask_token", "neck.mask_token"),
    ("decoder_pos_embed", "neck.decoder_pos_embed"),
]
_MM_BLOCK = [(".norm1.", ".ln1."), (".norm2.", ".ln2."), (".mlp.fc1.", ".ffn.layers.0.0."), (".mlp.fc2.", ".ffn.layers.1.")]
# transformers ViTMAEForPreTraining in the Hub's layout (facebook/vit-mae-*), which transformers 4.x and 5.x read;
# its q/k/v are separate Linears (_split_qkv). transformers 5's save_pretrained names the decoder blocks
# decoder.decoder_encoder.layer.N: the second decoder_blocks entry reads those too.
_HF_NAMES = [
    ("patch_embed.proj.", "vit.embeddings.patch_embeddings.projection."), ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"), ("blocks.", "vit.encoder.layer."),
    ("norm.", "vit.layernorm."), ("decoder_embed.", "decoder.decoder_embed."), ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.decoder_pos_embed"), ("decoder_blocks.", "decoder.decoder_layers."),
    ("decoder_blocks.", "decoder.decoder_encoder.layer."), ("decoder_norm.", "decoder.decoder_norm."),
    ("decoder_pred.", "decoder.decoder_pred."),
]
_HF_BLOCK = [(".norm1.", ".layernorm_before."), (".attn.proj.", ".attention.output.dense."),
             (".attn.", ".attention.attention."), (".norm2.", ".layernorm_after."), (".mlp.fc1.", ".intermediate.dense."),
             (".mlp.fc2.", ".output.dense.")]
_OUR_BLOCK = re.compile(r"^(decoder_)?blocks\.\d+\.")
_QKV = ("query", "key", "value")


def _rename(name: str, pairs, what: str, reverse: bool = False) -> str:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    raise UserError(f"no {what} counterpart for key {name!r}")


def _to_name(name: str, names, block, what: str) -> str:
    out = _rename(name, names, what)
    if _OUR_BLOCK.match(name):
        for ours, theirs in block:
            out = out.replace(ours, theirs)
    return out


def _from_name(name: str, names, block) -> str:
    out = _rename(name, names, "mff_ds", reverse=True)
    if _OUR_BLOCK.match(out):
        for ours, theirs in block:
            out = out.replace(theirs, ours)
    return out


def to_mmpretrain(tensors: dict) -> dict:
    """Any dict keyed by our parameter names (state dict, gradients) -> mmpretrain keys and layouts."""
    out = {}
    for k, v in tensors.items():
        mk = _to_name(k, _MM_NAMES, _MM_BLOCK, "mmpretrain")
        out[mk] = v.reshape(-1, 1, 1, 1) if k == "fusion_logits" and v is not None else v
    return out


def from_mmpretrain(tensors: dict) -> dict:
    """mmpretrain keys (backbone./neck.) -> our names and layouts. Data-preprocessor/head keys are dropped."""
    out = {}
    for k, v in tensors.items():
        if not k.startswith(("backbone.", "neck.")):
            continue
        ok = _from_name(k, _MM_NAMES, _MM_BLOCK)
        out[ok] = v.reshape(-1) if ok == "fusion_logits" else v
    return out


def to_hf_state(tensors: dict) -> dict:
    """Our encoder + decoder names (no fusion: ViTMAE has no place for it) -> transformers ViTMAE (Hub layout)."""
    return {_to_name(k, _HF_NAMES, _HF_BLOCK, "transformers ViTMAE"): v for k, v in _split_qkv(tensors).items()}


def from_hf_state(tensors: dict) -> dict:
    """transformers ViTMAEForPreTraining keys (vit./decoder.) -> our names, q/k/v joined into qkv."""
    return _join_qkv({_from_name(k, _HF_NAMES, _HF_BLOCK): v for k, v in tensors.items()})


def _split_qkv(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:  # timm's fused (3C, C) / (3C,) is q, k, v stacked along dim 0
            out.update({k.replace(".qkv.", f".{part}."): t for part, t in zip(_QKV, v.chunk(3))})
        else:
            out[k] = v
    return out


def _join_qkv(sd: dict) -> dict:
    out, groups = {}, {}
    for k, v in sd.items():
        part = next((p for p in _QKV if f".attn.{p}." in k), None)
        if part is None:
            out[k] = v
        else:
            groups.setdefault(k.replace(f".{part}.", ".qkv."), {})[part] = v
    for k, g in groups.items():
        if len(g) != len(_QKV):
            raise UserError(f"{k}: expected query, key and value tensors, got only {sorted(g)}")
        out[k] = torch.cat([g[p] for p in _QKV])
    return out


# ------------------------------------------------------------------ mmpretrain config text
def _literal(node):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        vals = [_literal(e) for e in node.elts]
        return vals if isinstance(node, ast.List) else tuple(vals)
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand)
    raise UserError(f"unsupported config expression {ast.dump(node)[:60]}")


def parse_mm_config(text: str) -> dict:
    """Evaluate the literal assignments of an mmengine config dump (no code is executed)."""
    out = {}
    for stmt in ast.parse(text).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = _literal(stmt.value)
            except ValueError:
                pass
    return out


# mmpretrain VisionTransformer arch_zoo heads / the string presets we can meet in configs
_MM_ARCH_HEADS = {"s": 8, "small": 8, "b": 12, "base": 12, "l": 16, "large": 16, "h": 16, "huge": 16,
                  "deit-t": 3, "deit-tiny": 3, "deit-s": 6, "deit-small": 6, "deit-b": 12, "deit-base": 12}


def _hints_from_cfg(model_cfg: dict) -> dict:
    hints = {}
    bb, neck, head = model_cfg.get("backbone", {}), model_cfg.get("neck", {}), model_cfg.get("head", {})
    arch = bb.get("arch", "b")
    if isinstance(arch, dict):
        if "num_heads" in arch:
            hints["num_heads"] = arch["num_heads"]
    elif str(arch).lower() in _MM_ARCH_HEADS:
        hints["num_heads"] = _MM_ARCH_HEADS[str(arch).lower()]
    oi = bb.get("out_indices", -1)  # mmpretrain's defaults where the config is silent
    hints["out_indices"] = list(oi) if isinstance(oi, (list, tuple)) else [oi]
    hints["mask_ratio"] = float(bb.get("mask_ratio", 0.75))
    hints["decoder_num_heads"] = neck.get("decoder_num_heads", 16)
    hints["norm_pix_loss"] = bool(head.get("norm_pix", False))
    return hints


# ------------------------------------------------------------------ shape inference
def _count(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict) -> dict:
    """Sizes that the state dict (our names) determines; heads, out_indices and mask ratio it cannot."""
    for k in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if k not in sd:
            raise UserError(f"not an MAE/MFF ViT checkpoint: expected key {k!r}, found keys like {sorted(sd)[:5]}")
    w = sd["patch_embed.proj.weight"]
    C, in_chans, p = w.shape[0], w.shape[1], w.shape[-1]
    L = sd["pos_embed"].shape[1] - 1
    grid = int(round(L ** 0.5))
    if grid * grid != L:
        raise UserError(f"pos_embed: expected a square grid of patches (+1 cls), got {L} patches")
    cfg = dict(embed_dim=C, in_chans=in_chans, patch_size=p, img_size=grid * p, depth=_count(sd, "blocks."),
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / C)
    if "decoder_embed.weight" in sd:
        D = sd["decoder_embed.weight"].shape[0]
        cfg.update(decoder_embed_dim=D, decoder_depth=_count(sd, "decoder_blocks."),
                   decoder_mlp_ratio=sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / D)
    return cfg


def _build_and_load(sd: dict, hints: dict, overrides: dict, source: str, strict_decoder: bool = True):
    cfg = infer_config(sd)
    K = sd["fusion_logits"].numel() if "fusion_logits" in sd else 1
    guessed = []
    cfg.setdefault("decoder_num_heads", 16)
    for key, default in (("num_heads", max(1, cfg["embed_dim"] // 64)),
                         ("decoder_num_heads", max(1, cfg.get("decoder_embed_dim", 512) // 32)),
                         ("out_indices", default_out_indices(cfg["depth"], K) if K > 1 else [cfg["depth"] - 1]),
                         ("mask_ratio", 0.75), ("norm_pix_loss", True)):
        if key in hints:
            cfg[key] = hints[key]
        elif key not in overrides:
            cfg[key] = default
            guessed.append(f"{key}={default}")
    cfg.update(overrides)
    if guessed:
        warnings.warn(f"{source}: no config says {', '.join(k.split('=')[0] for k in guessed)}; "
                      f"using the standard defaults {', '.join(guessed)} (pass them as overrides to change)")
    if len(cfg["out_indices"]) != K:
        raise UserError(f"{source}: the checkpoint has {K} fusion level(s) but out_indices is "
                         f"{cfg['out_indices']} ({len(cfg['out_indices'])} levels)")
    model = build_model(cfg)
    load_state_dict_checked(model, sd, source, allow_missing_decoder=not strict_decoder)
    return model


def load_state_dict_checked(model, sd: dict, source: str = "checkpoint", allow_missing_decoder: bool = False):
    """load_state_dict that names every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not (allow_missing_decoder and _is_decoder(k))]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)}"
              for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        msg = [f"{source} does not match the model architecture:"]
        if shapes:
            msg.append("  shape mismatch: " + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {missing[:8]}")
        if unexpected:
            msg.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}")
        raise UserError("\n".join(msg))
    model.load_state_dict(sd, strict=not allow_missing_decoder)
    return model


def _is_decoder(k: str) -> bool:
    return k.startswith(("decoder_", "mask_token"))


# ------------------------------------------------------------------ file IO
def save_file(obj: dict, path, metadata: dict | None = None):
    """Atomic save: write a temp file beside the target, then rename. .safetensors takes a flat tensor dict."""
    path = Path(path)

    def write(tmp):
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file as st_save
            flat = {k: v.detach().contiguous().clone() for k, v in obj.items()}
            st_save(flat, tmp, metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(obj if metadata is None else {**obj, **metadata}, tmp)
    atomic_write(path, write)


def read_file(path):
    """-> (tensors, metadata) for .safetensors or torch files."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, ValueError) as e:
            raise UserError(f"cannot read {path}: expected a .safetensors file, got one that is empty, truncated or "
                             f"not safetensors ({e})") from None
    from mff_ds.engine.safe_load import UNREADABLE, unreadable
    try:
        with warnings.catch_warnings():  # torch warns about the "protocol" byte of a file that is no pickle at all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True), {}
    except UNREADABLE as e:
        raise UserError(str(unreadable(path, e))) from None


def save_model(model, path):
    """Our native model file: state dict + model config (torch or safetensors by suffix)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if Path(path).suffix == ".safetensors":
        save_file(sd, path, {"format": FORMAT, "model_config": model.cfg.to_dict()})
    else:
        save_file({"model": sd}, path, {"format": FORMAT, "model_config": model.cfg.to_dict()})


def load_model(path, **overrides):
    """Load a file written by save_model (or the engine's final export)."""
    obj, meta = read_file(path)
    if meta:  # safetensors
        sd, cfg = obj, meta.get("model_config")
    else:
        if obj.get("format") != FORMAT:
            raise UserError(f"{path}: expected an mff_ds model file (format {FORMAT!r}); for other layouts use "
                             f"load_mmpretrain / load_mae")
        sd, cfg = obj["model"], obj["model_config"]
    model = build_model({**cfg, **overrides})
    return load_state_dict_checked(model, sd, str(path))


# ------------------------------------------------------------------ mmpretrain
def load_mmpretrain(path, **overrides):
    """Load an mmpretrain MFF or MAE pretraining checkpoint ({'meta': {'cfg': ...}, 'state_dict': ...})."""
    obj, st_meta = read_file(path)
    sd_mm = obj.get("state_dict", obj)
    if not any(k.startswith("backbone.") for k in sd_mm):
        raise UserError(f"{path}: expected mmpretrain keys starting with 'backbone.', got {sorted(sd_mm)[:5]}")
    hints = {}
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else st_meta  # .pth, or safetensors metadata
    cfg_text = meta.get("cfg")
    if cfg_text:
        hints = _hints_from_cfg(parse_mm_config(cfg_text).get("model", {}))
    return _build_and_load(from_mmpretrain(sd_mm), hints, overrides, f"mmpretrain checkpoint {path}")


def mm_config_text(cfg: ModelConfig) -> str:
    """The model part of an mmengine config, enough for load_mmpretrain (and readable by mmengine)."""
    kind = "MFF" if len(cfg.out_indices) > 1 else "MAE"
    return (f"model = dict(type='{kind}', backbone=dict(type='{kind}ViT', arch=dict(embed_dims={cfg.embed_dim}, "
            f"num_layers={cfg.depth}, num_heads={cfg.num_heads}, feedforward_channels={int(cfg.embed_dim * cfg.mlp_ratio)}), "
            f"img_size={cfg.img_size}, patch_size={cfg.patch_size}, mask_ratio={cfg.mask_ratio}, "
            f"out_indices={list(cfg.out_indices)}), neck=dict(type='MAEPretrainDecoder', "
            f"decoder_embed_dim={cfg.decoder_embed_dim}, decoder_depth={cfg.decoder_depth}, "
            f"decoder_num_heads={cfg.decoder_num_heads}), head=dict(type='MAEPretrainHead', "
            f"norm_pix={cfg.norm_pix_loss}, patch_size={cfg.patch_size}))\n")


def mmpretrain_checkpoint(model) -> dict:
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"meta": {"cfg": mm_config_text(model.cfg)}, "state_dict": to_mmpretrain(sd)}


# ------------------------------------------------------------------ timm / official MAE
def _encoder_state(model_or_sd) -> dict:
    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    return {k: v for k, v in sd.items() if not (_is_decoder(k) or k.startswith("fusion_"))}


def to_timm(model_or_sd) -> dict:
    """Encoder state dict for timm VisionTransformer(num_classes=0, global_pool='token'), strict=True."""
    return {k: v.detach().cpu() for k, v in _encoder_state(model_or_sd).items()}


def timm_name(cfg: ModelConfig) -> str:
    """The registered timm ViT with this width, depth, heads and patch (timm takes the image size as img_size)."""
    import timm
    from mff_ds.models.archs import SIZES
    for size, (dim, depth, heads) in SIZES.items():
        name = f"vit_{size}_patch{cfg.patch_size}_224"
        if (cfg.embed_dim, cfg.depth, cfg.num_heads) == (dim, depth, heads) and timm.is_model(name):
            return name
    raise UserError(f"no registered timm ViT with embed {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, "
                     f"patch {cfg.patch_size}")


def to_mae(model_or_sd, full: bool = True) -> dict:
    """Official facebookresearch/mae layout: {'model': ...}; full=False gives the encoder-only file."""
    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    keep = {k: v.detach().cpu() for k, v in sd.items() if not k.startswith("fusion_")}
    return {"model": keep if full else _encoder_state(keep)}


def load_mae(path, **overrides):
    """Load an official MAE checkpoint (encoder-only or _full; training checkpoints too)."""
    obj, meta = read_file(path)
    if (meta or obj).get("format") == FORMAT:  # one of our files: its config says the fused levels, no guessing
        return load_model(path, **overrides)
    sd = obj.get("model", obj)
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    full = "decoder_embed.weight" in sd
    if not full:
        warnings.warn(f"{path}: encoder-only MAE checkpoint; the decoder is freshly initialised")
    return _build_and_load(sd, {}, overrides, f"MAE checkpoint {path}", strict_decoder=full)


# ------------------------------------------------------------------ any format
def _format_of(obj: dict, meta: dict, path) -> str:
    if meta.get("format") == FORMAT or obj.get("format") == FORMAT:
        return "mff_ds"
    sd = obj.get("state_dict", obj.get("model", obj))
    keys = [k for k in sd if isinstance(k, str)]
    if any(k.startswith("backbone.") for k in keys):
        return "mmpretrain"
    if "patch_embed.proj.weight" in keys:
        return "mae"
    raise UserError(f"{path}: cannot tell the checkpoint format from keys like {keys[:5]}; expected "
                     f"--checkpoint-format mff_ds, mmpretrain or mae")


def detect_format(path) -> str:
    """'mff_ds', 'mmpretrain' or 'mae' from the file's layout (timm / MAE key names count as 'mae')."""
    return _format_of(*read_file(path), path)


LOADERS = {"mmpretrain": load_mmpretrain, "mae": load_mae, "mff_ds": load_model}


def load_any(path, fmt: str = "auto", **overrides):
    """The pretraining model (MaskedAutoencoder) from a checkpoint of any supported format."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in LOADERS:
        raise UserError(f"--checkpoint-format: expected one of auto, {', '.join(LOADERS)}, got {fmt!r}")
    return LOADERS[fmt](path, **overrides)


def model_state(path) -> dict:
    """The tensors of a checkpoint of any supported format under our names (no model is built), for loading
    into a model that exists (pretraining's init_from)."""
    obj, meta = read_file(path)
    fmt = _format_of(obj, meta, path)
    if fmt == "mff_ds":
        return obj if meta else obj["model"]
    if fmt == "mmpretrain":
        return from_mmpretrain(obj.get("state_dict", obj))
    return {k: v for k, v in obj.get("model", obj).items() if torch.is_tensor(v)}
