"""Rank-0 observability: metrics.jsonl + TensorBoard, the tqdm progress bar, device memory."""
import json
import os
import resource

import torch


def memory_gb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
                "mem/peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"mem/host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsLogger:
    """Writes one JSON line per logging step and the same scalars to TensorBoard (rank 0 only).

    A record that is not a step's metrics (the start-up timeline) is `attach`ed: it goes, under its key, into the
    next step's line (and its numbers to TensorBoard as key/name), so every line keeps "step", "loss" and "lr" for
    the readers of metrics.jsonl; one that no line took is written alone, with its step, when the logger closes.
    Records of events (a completed checkpoint) are `event`ed: listed under their key in the next line, in the order
    they happened, and their numbers go to TensorBoard at the event's own step (events after the last line, the
    final checkpoint's, are in TensorBoard and the run's summary only: every line keeps its loss)."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = True, resumed_at: int = None):
        """resumed_at: the step of the checkpoint the run resumed: what an earlier attempt logged after it (steps it
        redoes) is dropped, from metrics.jsonl and from TensorBoard (purge_step), so each step is logged once."""
        self.enabled = enabled
        self.tb = None
        self.f = None
        self.attached = {}  # key -> (step, record) for the next line
        self.events = {}    # key -> [record, ...] for the next line
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        if resumed_at is not None and os.path.exists(path):
            _drop_after(path, resumed_at)
        self.f = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=None if resumed_at is None else resumed_at + 1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        extra = {k: record for k, (_, record) in self.attached.items()}
        events, self.attached, self.events = self.events, {}, {}
        self.f.write(json.dumps({"step": step, **metrics, **extra, **events}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in {**metrics, **_flat(extra)}.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def attach(self, step: int, key: str, record: dict) -> None:
        """`record` (of optimizer step `step`) under `key` in the next line."""
        if self.enabled:
            self.attached[key] = (step, record)

    def event(self, step: int, key: str, record: dict) -> None:
        """`record` of something that happened at optimizer step `step`, in the list under `key` of the next line;
        its numbers to TensorBoard now, as key/name at `step`."""
        if not self.enabled:
            return
        self.events.setdefault(key, []).append(record)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{key}/{k}", v, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, img, step)

    def close(self) -> None:
        if self.f and not self.f.closed:
            for key, (step, record) in self.attached.items():  # no step was logged after it (the run failed)
                self.f.write(json.dumps({"step": step, key: record}) + "\n")
            self.attached = {}  # events after the last line (the final checkpoint) are in TensorBoard and the summary
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def _drop_after(path: str, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (atomically: a kill leaves the old file or the new one); a line
    cut short by a kill is dropped too."""
    from mff_ds.common import write_text
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    write_text(path, "".join(kept))


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"startup": {"total_s": 1, "phases": {"imports": 2}}} -> {"startup/total_s": 1, "startup/imports": 2}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/" if not prefix else prefix))
        else:
            out[prefix + k] = v
    return out


def progress_bar(enabled: bool, total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, smoothing=0.1)
