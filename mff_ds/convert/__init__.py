"""Checkpoint interop (formats.py: this project's model files, mmpretrain MFF/MAE, official MAE, timm, safetensors;
__main__.py: the command line). `from mff_ds import convert; convert.load_any(...)` reaches formats.py's names,
imported on first use, so that `mff-ds convert --help` answers without loading torch."""
from mff_ds.common import lazy_exports

__getattr__ = lazy_exports(__name__, "formats")
