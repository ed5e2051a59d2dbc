"""Data pipeline: a registered source (ImageFolder, WebDataset shards, demo, synthetic, ...) -> fast decode + a
registered augmentation (MFF / MAE crops) -> uint8 batches per rank."""
from .loader import (IMAGENET_MEAN, IMAGENET_STD, BadDataError, DataConfig, Loader, build_loader,
                     normalize)
from .registry import SOURCES, source_for_path
from .transforms import AUGMENTS, BadImage, decode_rgb, make_augment

__all__ = ["DataConfig", "build_loader", "normalize", "Loader", "BadDataError", "BadImage", "IMAGENET_MEAN",
           "IMAGENET_STD", "decode_rgb", "make_augment", "SOURCES", "AUGMENTS", "source_for_path"]
