"""What every part of the package shares: the user-error base, atomic file writes, the precision -> dtype map,
seeding, registries.

Kept free of imports from the rest of mff_ds so that data, models, engine, eval, convert and the benchmarks can
all use it without a cycle, and free of a torch import at import time.
"""
import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

def lazy_exports(package: str, where) -> Callable[[str], object]:
    """A package's module-level __getattr__ that imports its names on first use, so that a command's --help (or a
    signal handler installed first) does not wait for torch: `where` maps each name to the submodule that holds it,
    or is the one submodule that holds them all."""
    import importlib

    def __getattr__(name: str):
        module = where if isinstance(where, str) else where.get(name)
        try:
            if module is None or name.startswith("__"):
                raise AttributeError(name)
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    return __getattr__


class UserError(ValueError):
    """Bad input or state the user can fix (a recipe, data, a checkpoint refused, a file they named that is missing):
    the command lines print it as one line and exit 2. Anything else is a bug and keeps its traceback (exit 1).
    A ValueError, so callers that catch ValueError around user input keep working."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named is not there."""




def __getattr__(name):
    """DTYPES: the recipe's `precision:` names -> the dtype of the weights the model holds and the inputs it is
    fed (DeepSpeed's bf16 / fp16 modes keep 16-bit weights; fp32 and the autocast modes amp-bf16 / amp-fp16 keep
    fp32 weights). COMPUTE_DTYPES: -> the dtype the matmuls run in (amp-*: the autocast dtype), for consumers
    that pick kernels or report it. Built on first use: this module is imported before torch (signal handlers,
    recipes, --help)."""
    if name in ("DTYPES", "COMPUTE_DTYPES"):
        import torch
        f32, b16, f16 = torch.float32, torch.bfloat16, torch.float16
        if name == "DTYPES":
            return {"fp32": f32, "bf16": b16, "fp16": f16, "amp-bf16": f32, "amp-fp16": f32}
        return {"fp32": f32, "bf16": b16, "fp16": f16, "amp-bf16": b16, "amp-fp16": f16}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def atomic_write(path, write: Callable[[str], None], *, fsync: bool = False) -> None:
    """write(tmp) fills a hidden temporary file beside `path`; one os.replace then puts it in place, so a reader
    (or a crash) sees the old file or the new one, never a part. The temporary file is removed when `write`
    fails. fsync: the data reaches the disk before the rename (completion markers that vouch for a checkpoint).

    The file gets the mode a plain open() would give (mkstemp's 0600 would hide results from a shared group)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str, *, fsync: bool = False) -> None:
    """Atomically write `text` to `path`."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write, fsync=fsync)


def write_json(path, obj, *, indent: int = 2, fsync: bool = False) -> None:
    """Atomically write `obj` as JSON to `path`."""
    write_text(path, json.dumps(obj, indent=indent), fsync=fsync)


def cache_dir() -> Path:
    """Where downloads and built data sets are kept: $MFF_DS_CACHE, else $XDG_CACHE_HOME/mff_ds, else
    ~/.cache/mff_ds (the XDG convention torch.hub and pip follow)."""
    if os.environ.get("MFF_DS_CACHE"):
        return Path(os.environ["MFF_DS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mff_ds"


# This process's start-up, phase -> seconds: the engine's trainer times its own phases and reports them after the first
# step (engine/trainer.py); lower layers (the data index) add theirs here, as they know nothing of the trainer.
STARTUP: dict = {}


@contextlib.contextmanager
def startup_phase(name: str):
    """Add the time the block takes to STARTUP[name] (phases entered twice add up)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        STARTUP[name] = STARTUP.get(name, 0.0) + time.perf_counter() - t


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Registry:
    """Implementations of one kind, found by name: `SOURCES = Registry("data source")`, then
    `@SOURCES.register("lmdb")` on a class (or function) adds it, in order, and `SOURCES.get("lmdb")` returns it.
    Recipes name entries, so an unknown name is one clear error listing the known ones."""

    def __init__(self, kind: str):
        self.kind, self._entries = kind, {}

    def register(self, name: str):
        def add(obj):
            if name in self._entries:  # two modules claiming a name: the later one would silently win
                raise ValueError(f"{self.kind}: expected a new name, got {name!r} (already {self._entries[name]!r})")
            obj.name = name  # the entry knows what recipes call it (for its messages)
            self._entries[name] = obj
            return obj
        return add

    def get(self, name):
        if name not in self:
            raise ValueError(f"{self.kind}: expected one of {self.names()}, got {name!r}")
        return self._entries[name]

    def names(self) -> list:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._entries
