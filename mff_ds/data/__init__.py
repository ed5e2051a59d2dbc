"""Data pipeline: a registered source (ImageFolder, WebDataset shards, demo, synthetic, ...) -> fast decode + a
registered augmentation (MFF / MAE crops) -> uint8 batches per rank. ImageFolder files come from the dataset index
(index.py, `mff-ds index`).

Names are imported on first use: `mff-ds index --help` answers without loading torch.
"""
from mff_ds.common import lazy_exports

_WHERE = {**dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "BadDataError", "DataConfig", "Loader", "build_loader",
                           "normalize"), "loader"),
          **dict.fromkeys(("SOURCES", "source_for_path"), "registry"),
          **dict.fromkeys(("AUGMENTS", "BadImage", "decode_rgb", "make_augment"), "transforms")}
__all__ = list(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
