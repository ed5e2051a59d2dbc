"""The end-of-run exports of a pretraining: our model file, the timm encoder file and the timm folder."""
import os
from typing import List

from mff_ds.convert import FORMAT, save_file, to_timm
from mff_ds.engine.checkpoint import fp32_state_dict
from mff_ds.hub import to_timm_dir


def export(engine, root: str, tag: str, out_dir: str, meta: dict) -> List[str]:
    """Rank 0: model_fp32.safetensors (our model file: `mff_ds.convert.load_model` reads it),
    encoder_timm.safetensors (strict-loads into the matching timm ViT) and the folder encoder_timm/
    (`timm.create_model("local-dir:.../encoder_timm", pretrained=True)`)."""
    sd = fp32_state_dict(engine, root, tag)
    cfg = engine.module.cfg.to_dict()
    model_path = os.path.join(out_dir, "model_fp32.safetensors")
    save_file(sd, model_path, {**meta, "format": FORMAT, "model_config": cfg})
    timm_path = os.path.join(out_dir, "encoder_timm.safetensors")
    save_file(to_timm(sd), timm_path, {**meta, "model_config": cfg})
    timm_dir = str(to_timm_dir(sd, engine.module.cfg, os.path.join(out_dir, "encoder_timm")))
    return [model_path, timm_path, timm_dir]
