"""Checkpoint interop (formats.py: this project's model files, mmpretrain MFF/MAE, official MAE, timm, safetensors;
__main__.py: the command line). `from mff_ds import convert; convert.load_any(...)` reaches formats.py's names,
imported on first use, so that `mff-ds convert --help` answers without loading torch."""
import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module(f"{__name__}.formats"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(dir(importlib.import_module(f"{__name__}.formats"))))
