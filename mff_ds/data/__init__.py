"""Data pipeline: ImageFolder / WebDataset sources -> fast decode + MFF/MAE crops -> uint8 batches per rank."""
from .loader import (IMAGENET_MEAN, IMAGENET_STD, BadDataError, DataConfig, Loader, build_loader,
                     normalize)
from .transforms import BadImage, decode_rgb, make_augment

__all__ = ["DataConfig", "build_loader", "normalize", "Loader", "BadDataError", "BadImage", "IMAGENET_MEAN",
           "IMAGENET_STD", "decode_rgb", "make_augment"]
