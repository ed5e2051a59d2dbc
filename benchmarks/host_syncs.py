"""Count the host-device synchronisation points of a piece of code, on CPU as on CUDA.

A sync point is where the host must wait for the device: a tensor turned into a Python value (`.item()`,
`.tolist()`, `bool()`, `float()`, `int()`, `.cpu()`, `.numpy()`, `.to("cpu")` from a device), or an explicit synchronize
(`torch.cuda.synchronize`, DeepSpeed's `get_accelerator().synchronize()`, a stream's or event's). On CUDA each one
drains the launch queue, so the device idles while the host catches up; counting them on CPU, where they cost
nothing, predicts that (conservatively: on CPU every tensor counts, also those that would stay on the host in a
CUDA run). Conversions are seen through a TorchFunctionMode (every call from DeepSpeed, torch or our
code), synchronizes by wrapping the functions for the duration.

    with SyncCounter() as c:
        step()
    c.total, c.counts  # Counter({'item': 2, 'accelerator.synchronize': 1, ...})
"""
import collections

import torch
from torch.overrides import TorchFunctionMode

CONVERSIONS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


def _to_host(args, kwargs) -> bool:
    """`.to(...)` from an accelerator to the CPU (a CPU-to-CPU `.to` is a no-op; CPU-to-device does not wait)."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    for a in list(args[1:]) + list(kwargs.values()):
        if isinstance(a, torch.device) and a.type == "cpu" or isinstance(a, str) and a.startswith("cpu"):
            return True
    return False


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self._patched = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in CONVERSIONS or (name == "to" and _to_host(args, kwargs)):
            self.counts[name] += 1
        return func(*args, **kwargs)

    def _wrap(self, owner, attr, label):
        orig = getattr(owner, attr, None)
        if orig is None:
            return

        def counted(*a, **k):
            self.counts[label] += 1
            return orig(*a, **k)
        self._patched.append((owner, attr, orig, attr in vars(owner)))
        setattr(owner, attr, counted)

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator
        acc = get_accelerator()
        self._wrap(acc, "synchronize", "accelerator.synchronize")
        self._wrap(torch.cuda, "synchronize", "cuda.synchronize")
        self._wrap(torch.cuda.Stream, "synchronize", "stream.synchronize")
        self._wrap(torch.cuda.Event, "synchronize", "event.synchronize")
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attr, orig, own in reversed(self._patched):
            if own:
                setattr(owner, attr, orig)
            else:  # a method of the instance's class: drop the instance attribute that shadowed it
                delattr(owner, attr)
        self._patched.clear()
        return super().__exit__(*exc)
