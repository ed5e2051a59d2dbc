"""build_loader(): uint8 batches for one rank, equal length on every rank, exact resume, bad-sample accounting.

The samples come from the source `data.source` names (registry.SOURCES: files by index, shard streams, or
finished synthetic batches); this module does not know which. Workers build whole batches (decode + augment +
stack into uint8 (B, 3, S, S)) with the augmentation `data.augment` names (transforms.AUGMENTS), or with
`decode: gpu` read the files and draw the augmentation parameters while the main process decodes and augments on
the device (`decode.py`); the main process restores batch order, counts bad samples and stops the run when their
fraction exceeds `max_bad_fraction`.
A bad sample is replaced by a copy of a good one of the same batch, so batch b always covers the same stream
positions: that is what makes `skip_batches` exact (skipped shard samples are read but not decoded).
Normalisation happens on the device: `normalize(images.to(device))` (a no-op copy for device-decoded batches).
"""
import functools
import math
import multiprocessing as mp
import sys
import time
import warnings

from typing import Literal, Optional

import numpy as np
import pydantic
import torch
from pydantic import field_validator, model_validator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mff_ds.common import UserError
from mff_ds.schema import Bool, NonNegInt, Probability, Section, fail, int_, problems_of

from .decode import DECODES, Prefetcher, decode_batch, fill_bad, nvjpeg_ok, pack_batch
from .registry import SOURCES, Plan
from .transforms import AUGMENTS, finish, make_augment, prepare, process

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
MAX_EXAMPLES = 10
BAD_LOG_EVERY_S = 30.0  # at most one "skipped" line per process this often (a bad shard can hold thousands)


class BadDataError(UserError):
    """Too many unreadable samples: the data needs fixing (or `max_bad_fraction` raising), not the code."""


class DataConfig(Section):
    source: str = "demo"                # a registry.SOURCES name: demo | imagefolder | webdataset | synthetic | ...
    path: Optional[str] = None          # ImageFolder root, or shard path / brace pattern
    index: Optional[str] = None         # imagefolder: the dataset index file (mff-ds index) or an mmpretrain list
                                        # file (`relative/path label` lines); None: found or built (docs/DATA.md)
    allow_missing: Bool = False         # a list file's files that are not there: left out and named (true), or
                                        # the start refused naming them (false)
    augment: str = "mff"                # mff (MFF reference) | mae (RandomResizedCrop 0.2-1) | center (eval)
    num_workers: NonNegInt = 4
    prefetch_factor: int_(ge=1) = 2
    pin_memory: Bool = True
    fast_decode: Bool = True            # reduced-size JPEG decoding with libjpeg-turbo (CPU decoding)
    decode: Literal[DECODES] = "auto"   # gpu: decode + augment batches on the device (nvJPEG) | cpu: in the
                                        # workers | auto: gpu where CUDA exists
    resample_shards: Bool = False       # draw shards with replacement (allows fewer shards than readers)
    max_bad_fraction: Probability = 0.01
    shuffle_buffer: NonNegInt = 1000    # samples, per worker (webdataset)
    num_samples: Optional[int_(ge=1)] = None  # epoch size for shards without _info.json (and for synthetic)

    # the registries fill up at import (plugins may add names), so these are checked by name, not as Literals
    @field_validator("source")
    @classmethod
    def _registered_source(cls, v):
        if v not in SOURCES:
            raise ValueError(f"expected one of {SOURCES.names()}, got {v!r}")
        return v

    @field_validator("augment")
    @classmethod
    def _registered_augment(cls, v):
        if v not in AUGMENTS:
            raise ValueError(f"expected one of {AUGMENTS.names()}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _path_suits_the_source(self):
        source = SOURCES.get(self.source)
        fail([(k, why) for k, why in (("path", source.path_problem(self.path)),
                                      ("index", source.index_problem(self.index))) if why])
        return self


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32):
    """uint8 (B, 3, H, W) or (3, H, W) in 0-255 RGB -> (x - mean) / std as `dtype`, on the images' device."""
    if images.dtype != torch.uint8 or images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"normalize: expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return images.float().sub_(m).div_(s).to(dtype)


class _Batches(IterableDataset):
    """Yields (batch_index, images uint8 or decode.PackedBatch, labels int64, bad [(k, name, reason)], n_samples) for
    the batches of this worker, from the source's samples (or its finished batches)."""

    def __init__(self, source, plan, cfg, state, pack=False):
        self.source, self.plan, self.cfg = source, plan, cfg
        self.state = state  # shared with persistent workers: [epoch, skip_batches]
        self.pack = pack  # decode: gpu -> ship the files and parameters (decode.PackedBatch)
        self.aug = make_augment(cfg.augment, plan.size)

    seed = property(lambda self: self.plan.seed)  # the Loader's generator
    size = property(lambda self: self.plan.size)  # device decoding (_decode_item)

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        epoch, skip = int(self.state[0]), int(self.state[1])
        for b, batch in self.source.batches(self.plan, epoch, skip, w, nw):
            if self.source.ready:  # finished images: nothing to decode, nothing bad
                yield b, *batch, [], len(batch[1])
            else:
                yield self._make(b, epoch, batch)

    def _make(self, b, epoch, raw):
        """-> (b, uint8 images or decode.PackedBatch, labels, bad [(k, sample name, reason)], n)."""
        rng = np.random.default_rng([self.seed, epoch, self.plan.rank, b])
        n, fast = len(raw), self.cfg.fast_decode
        imgs = None if self.pack else torch.empty((n, 3, self.size, self.size), dtype=torch.uint8)
        labels = torch.tensor([label for _, _, label in raw], dtype=torch.int64)
        good, bad, jpegs, done = [], [], [None] * n, {}
        for k, (name, data, _) in enumerate(raw):
            try:
                if not isinstance(data, bytes):  # str: read error or broken shard; None: no image entry
                    raise ValueError(data or "sample has no image entry")
                if not self.pack:  # the CPU path
                    imgs[k] = process(data, self.aug, rng, fast)
                    good.append(k)
                    continue
                image, p = prepare(data, self.aug, rng, fast)  # process's own steps: both paths draw alike
                if nvjpeg_ok(data, image):
                    jpegs[k] = (data, p)  # decoded on the device
                else:
                    done[k] = finish(image, self.aug, p, fast)
            except Exception as e:  # never let one file kill a worker
                bad.append((k, name, str(e)[:200]))
        if self.pack:
            return b, pack_batch(jpegs, done, [name for name, _, _ in raw], self.size), labels, bad, n
        fill_bad(imgs, labels, good, bad)
        return b, imgs, labels, bad, n


def _decode_item(ds, device, item):
    b, packed, labels, bad, n = item
    imgs, labels, bad = decode_batch(packed, labels, bad, ds.aug, ds.size, device, ds.cfg.fast_decode)
    return b, imgs, labels, bad, n


def decode_device(cfg, source, device=None):
    """Where batches are decoded: None (in the workers) or a torch.device (decode: gpu, or auto with CUDA)."""
    if source.ready or cfg.decode == "cpu" or (cfg.decode == "auto" and not torch.cuda.is_available()):
        return None
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if not torch.cuda.is_available():
        warnings.warn("data.decode=gpu without CUDA: batches are decoded in the main process on the CPU")
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())  # the trainer has set its rank's device


class Loader:
    """Iterable over this rank's (images uint8 (B,3,S,S), labels int64 (B,)) for one epoch.

    len(loader)          batches per epoch on this rank (equal on every rank); iterating yields
                         len(loader) - skip_batches batches, starting at batch index `skip_batches`.
    loader.bad_samples   samples skipped (replaced) so far this epoch; `bad_examples` lists up to 10 as
                         "path-or-shard:key: reason"; `seen_samples` counts the samples read.
    loader.take_bad()    every skipped sample since the last call, as (epoch, batch index, "path-or-shard:key",
                         reason): the trainer names each in OUTPUT_DIR/bad_samples/ (the console line is rate-limited).
    loader.set_epoch(e, skip_batches=0)   reuse the same (persistent) workers for another epoch.
    loader.device        where batches are decoded (decode: gpu; images arrive there), None: in the workers.
    Raises BadDataError when bad_samples / seen_samples exceeds max_bad_fraction (checked once 1000 samples,
    or the whole epoch when shorter, have been seen).
    """

    def __init__(self, dataset, cfg, num_samples, epoch, skip_batches, device=None):
        self.dataset, self.cfg, self.num_samples, self.device = dataset, cfg, num_samples, device
        self._bad_logged_at, self._bad_unlogged = float("-inf"), 0  # rate limit of the "skipped" lines
        self._bad_records = []  # (epoch, batch, sample, reason) not yet taken by take_bad()
        self.batches_per_epoch, self.micro_batch = dataset.plan.batches, dataset.plan.batch
        nw = cfg.num_workers
        # The DataLoader's first iter() draws the workers' base seed from `generator`, by default torch's global
        # one: after a resume restored the RNG states that draw would shift every later random mask. Workers use
        # only explicit (seed, epoch, rank, batch) generators, so a private generator changes nothing else.
        self._dl = DataLoader(dataset, batch_size=None, num_workers=nw,  # packed files: nothing to pin
                              pin_memory=cfg.pin_memory and torch.cuda.is_available() and device is None,
                              persistent_workers=nw > 0, prefetch_factor=cfg.prefetch_factor if nw else None,
                              generator=torch.Generator().manual_seed(dataset.seed))
        self.set_epoch(epoch, skip_batches)

    def set_epoch(self, epoch, skip_batches=0):
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches: expected 0..{self.batches_per_epoch}, got {skip_batches}")
        self.epoch, self.skip_batches = epoch, skip_batches
        self.bad_samples, self.bad_examples, self.seen_samples = 0, [], 0

    def __len__(self):
        return self.batches_per_epoch

    def take_bad(self) -> list:
        records, self._bad_records = self._bad_records, []
        return records

    def close(self) -> None:
        """Stop the persistent workers now. Without it they outlive the run until the garbage collector breaks the
        trainer's reference cycles: a process that trains several times (launch/eval_demo.py) kept one idle worker
        per finished run."""
        self._dl = None  # the DataLoader's only reference: dropping it shuts its iterator's workers down

    def __iter__(self):
        self.bad_samples, self.bad_examples, self.seen_samples = 0, [], 0
        self.dataset.state[0], self.dataset.state[1] = self.epoch, self.skip_batches
        remaining = sum(self.dataset.plan.length(b) for b in range(self.skip_batches, self.batches_per_epoch))
        check_after = min(1000, remaining)
        pending, nxt = {}, self.skip_batches
        it = iter(self._dl) if self.cfg.num_workers else iter(self.dataset)
        if self.device is not None:  # decode + augment on the device, a batch ahead, in a thread
            it = Prefetcher(it, functools.partial(_decode_item, self.dataset, self.device), self.device,
                            self.cfg.prefetch_factor)
        try:
            yield from self._ordered(it, pending, nxt, check_after)
        finally:
            if self.device is not None:
                it.close()

    def _ordered(self, it, pending, nxt, check_after):
        for item in it:
            pending[item[0]] = item
            while nxt in pending:  # shard workers resume out of order after a skip
                _, imgs, labels, bad, n = pending.pop(nxt)
                self._bad_records += [(self.epoch, nxt, name, why) for _, name, why in bad]
                nxt += 1
                self.seen_samples += n
                self.bad_samples += len(bad)
                messages = [f"{name}: {why}" for _, name, why in bad]
                self.bad_examples += messages[:MAX_EXAMPLES - len(self.bad_examples)]
                if bad:
                    self._log_bad(messages)
                if (self.seen_samples >= check_after
                        and self.bad_samples > self.cfg.max_bad_fraction * self.seen_samples):
                    raise BadDataError(
                        f"{self.bad_samples} of {self.seen_samples} samples could not be read "
                        f"({self.bad_samples / self.seen_samples:.1%} > data.max_bad_fraction="
                        f"{self.cfg.max_bad_fraction}); e.g. " + "; ".join(self.bad_examples[:5]))
                yield imgs, labels
        if nxt != self.batches_per_epoch:
            raise RuntimeError(f"data loader ended at batch {nxt} of {self.batches_per_epoch}")

    def _log_bad(self, bad):
        """One stderr line naming a skipped file, rate-limited; the lines not shown are counted in the next one."""
        self._bad_unlogged += len(bad)
        now = time.monotonic()
        if now < self._bad_logged_at + BAD_LOG_EVERY_S:
            return
        more = f" (+{self._bad_unlogged - 1} more since the last such line)" if self._bad_unlogged > 1 else ""
        print(f"warning: rank {self.dataset.plan.rank}: skipped a bad sample, replaced by a good one of its batch: "
              f"{bad[0]}{more}; {self.bad_samples} of {self.seen_samples} this epoch", file=sys.stderr, flush=True)
        self._bad_logged_at, self._bad_unlogged = now, 0


def build_loader(cfg, *, img_size, micro_batch, rank, world_size, seed, epoch, skip_batches=0,
                 drop_last=True, device=None):
    """DataConfig -> Loader for (rank, world_size). Same (seed, epoch, world_size, num_workers) => same stream.
    `device`: where `decode: gpu` decodes (default: the current CUDA device, or the CPU without CUDA)."""
    problems = []
    if isinstance(cfg, dict):
        try:
            cfg = DataConfig.model_validate(cfg)
        except pydantic.ValidationError as e:
            problems = problems_of(e, DataConfig, prefix="data.")
    for key, v, lo in (("img_size", img_size, 1), ("micro_batch", micro_batch, 1), ("world_size", world_size, 1),
                       ("rank", rank, 0), ("skip_batches", skip_batches, 0)):
        if not isinstance(v, int) or v < lo:
            problems.append(f"{key}: expected an integer >= {lo}, got {v!r}")
    if not problems and rank >= world_size:
        problems.append(f"rank: expected < world_size={world_size}, got {rank}")
    if problems:
        raise UserError("invalid data configuration:\n  " + "\n  ".join(problems))

    source = SOURCES.get(cfg.source)(cfg.path, num_samples=cfg.num_samples, index=cfg.index,
                                     allow_missing=cfg.allow_missing)
    total = len(source)
    per_rank = total // world_size if drop_last else math.ceil(total / world_size)
    nb = per_rank // micro_batch if drop_last else math.ceil(per_rank / micro_batch)
    if nb < 1:
        raise UserError(f"data: {total} samples over {world_size} ranks give {per_rank} per rank, "
                        f"fewer than micro_batch={micro_batch}: no full batch")
    last = micro_batch if drop_last else per_rank - (nb - 1) * micro_batch
    if cfg.num_workers > nb:
        warnings.warn(f"data.num_workers={cfg.num_workers} > {nb} batches per epoch; extra workers idle")
    plan = Plan(rank=rank, world=world_size, seed=seed, batch=micro_batch, batches=nb, last=last,
                drop_last=drop_last, size=img_size, resample=cfg.resample_shards, shuffle_buffer=cfg.shuffle_buffer)
    source.check(plan, max(cfg.num_workers, 1), epoch)
    dev = decode_device(cfg, source, device)
    ds = _Batches(source, plan, cfg, mp.RawArray("q", 2), pack=dev is not None)
    return Loader(ds, cfg, total, epoch, skip_batches, dev)
