"""The command line of mff_ds.convert (also `mff-ds convert`):

    python -m mff_ds.convert {from-mmpretrain,from-mae,to-timm,to-mae,to-mmpretrain} IN OUT
    python -m mff_ds.convert {to-timm-dir,to-hf} MODEL OUT_DIR      # folders timm / transformers load (mff_ds.hub)
    python -m mff_ds.convert from-hf HF_DIR OUT

IN / MODEL: a file, or a zoo name (mff_ds.zoo: fetched and verified); to-* commands take any format load_any reads.
It lives apart from the conversions so that they and mff_ds.hub, which uses them, do not import each other.
"""
import argparse
import sys
from pathlib import Path

from mff_ds.common import UserError


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mff_ds.convert", description="Checkpoint interop: this project's "
                                 "model files, mmpretrain MFF/MAE, official MAE, timm, safetensors.", allow_abbrev=False)
    ap.add_argument("command", choices=["from-mmpretrain", "from-mae", "from-hf", "to-timm", "to-timm-dir", "to-hf",
                                        "to-mae", "to-mmpretrain"])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--encoder-only", action="store_true", help="to-mae: write the encoder-only layout")
    ap.add_argument("--crop-pct", type=float, default=None, help="to-timm-dir: pretrained_cfg crop_pct "
                    "(default: the fine-tune recipes' val_crop_pct)")
    ap.add_argument("--interpolation", default=None, help="to-timm-dir: pretrained_cfg interpolation "
                    "(default: the fine-tune recipes' val_interpolation)")
    a = ap.parse_args(argv)
    try:
        model = _run(a)
    except (UserError, ImportError) as e:
        print(f"error: {a.command}: {e}", file=sys.stderr)
        return 2
    print(f"{a.command}: {a.src} -> {a.dst} ({model.cfg.depth} blocks, embed {model.cfg.embed_dim}, "
          f"{len(model.levels)} fused level(s))")
    return 0


def _run(a):
    from mff_ds import convert, hub, zoo  # here: --help answers without loading torch
    if a.command != "from-hf":  # a folder, not a file: no zoo entry is one
        a.src = zoo.resolve(a.src)
    st = Path(a.dst).suffix == ".safetensors"
    if a.command in ("from-mmpretrain", "from-mae", "from-hf"):
        load = {"from-mmpretrain": convert.load_mmpretrain, "from-mae": convert.load_mae, "from-hf": hub.from_hf}
        model = load[a.command](a.src)
        convert.save_model(model, a.dst)
        return model
    model = convert.load_any(a.src)
    if a.command == "to-timm":
        convert.save_file(convert.to_timm(model), a.dst)
    elif a.command == "to-timm-dir":
        hub.to_timm_dir(model, model.cfg, a.dst, crop_pct=a.crop_pct, interpolation=a.interpolation)
    elif a.command == "to-hf":
        hub.to_hf(model, a.dst)
    elif a.command == "to-mae":
        out = convert.to_mae(model, full=not a.encoder_only)
        convert.save_file(out["model"] if st else out, a.dst)
    elif st:  # safetensors: the mmengine cfg text travels in the metadata
        ck = convert.mmpretrain_checkpoint(model)
        convert.save_file(ck["state_dict"], a.dst, ck["meta"])
    else:
        convert.save_file(convert.mmpretrain_checkpoint(model), a.dst)
    return model


if __name__ == "__main__":
    sys.exit(main())
