"""Nothing read back from a checkpoint directory can execute code.

DeepSpeed reads its files with `torch.load(..., weights_only=False)` (engine resume, ZeRO/universal loaders,
zero_to_fp32), i.e. full unpickling: a crafted `*.pt` runs arbitrary code on `--resume`. Inside `weights_only_loads()`
every `torch.load` in the process (DeepSpeed's included: it looks `torch.load` up at each call) is forced to
`weights_only=True`, with an explicit allowlist of the few non-tensor classes DeepSpeed and our client state store.
Anything else is refused with one `CheckpointError` naming the file and the class.
We patch `torch.load` rather than set TORCH_FORCE_WEIGHTS_ONLY_LOAD because the environment variable is inherited
by child processes and can be overridden by the user's environment; the patch is scoped to the `with` block.
"""
import contextlib
import re
import threading

import torch

from mff_ds.common import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unsafe, damaged, unverifiable or unwritable; the message says which."""


# what torch.load raises for a refused global, random bytes (UnpicklingError), an empty file (EOFError) or a
# truncated zip archive (RuntimeError from PytorchStreamReader)
# Garbage fed to the weights-only unpickler fails in many ways (UnpicklingError, EOFError, IndexError from its stack,
# KeyError from its memo, struct.error, UnicodeDecodeError, ...): any of them means "not a readable checkpoint".
UNREADABLE = (Exception,)
_lock = threading.RLock()  # the patch is process-wide: one `with` block at a time (nesting is fine)


def allowlist() -> list:
    """The non-tensor classes found in DeepSpeed 0.19 checkpoints (ZeRO 0-3, fp32/bf16/fp16, universal) and in our
    client state (numpy's RNG state array). Listed with `torch.serialization.get_unsafe_globals_in_checkpoint`."""
    import numpy as np

    from .ds_compat import checkpoint_classes
    return [*checkpoint_classes(), np.ndarray, np.dtype, type(np.dtype(np.uint32)), np._core.multiarray._reconstruct]


def unreadable(path, err: Exception) -> CheckpointError:
    """One line for a torch.load(weights_only=True) failure: a refused class/function (code could run), or not a
    checkpoint at all (random bytes, empty or truncated file)."""
    m = re.search(r"GLOBAL ([\w.]+)", str(err))
    if m:
        return CheckpointError(f"refused to load {path}: it contains the class/function {m.group(1)}, which is not in "
                               f"the allowlist of what DeepSpeed and mff-ds store (mff_ds/engine/safe_load.py); "
                               f"loading it could execute code. Use a checkpoint from a trusted source.")
    detail = next((l.strip() for l in str(err).splitlines() if re.search("Unsupported|invalid load key", l)), "")
    return CheckpointError(f"cannot read {path}: expected a PyTorch checkpoint file, got one that is empty, truncated "
                           f"or not a checkpoint ({type(err).__name__}{': ' + detail if detail else ''})")


@contextlib.contextmanager
def weights_only_loads():
    """Within the block, every torch.load unpickles weights only (plus the allowlist)."""
    with _lock:
        original = torch.load

        def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
            try:
                return original(f, map_location=map_location, weights_only=True, **kwargs)
            except UNREADABLE as e:
                raise unreadable(f, e) from None

        torch.load = load
        try:
            with torch.serialization.safe_globals(allowlist()):
                yield
        finally:
            torch.load = original
