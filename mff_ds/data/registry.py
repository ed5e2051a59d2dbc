"""The data sources by name, `SOURCES`: what `data.source` names in the pretraining and evaluation recipes and what
the benchmarks open. `SOURCES.get(name)(path, split=..., num_samples=...)` builds one; len() = samples per epoch.

A source gives its samples in one of three ways, which pretraining (`loader.py`) and evaluation (`eval/data.py`)
both take without knowing the source:
- FileSource: by index, `sample(i)` -> (name, image bytes or a str saying why not, label); an epoch is a seeded
  permutation split over the ranks, skipped batches are not read (imagefolder, demo, digits);
- StreamSource: one stream per (rank, worker) reader; skipped batches are read but not decoded (webdataset);
- finished uint8 batches (`ready`), nothing to decode or augment (synthetic; not for evaluation).
A new source is one module with a class deriving from one of these, under `@SOURCES.register("name")`.
"""
import dataclasses
import os

import numpy as np
import torch

from mff_ds.common import Registry, UserError

from . import demo, sources
from .index import digest_of, open_index

SOURCES = Registry("data source")
SYNTHETIC_SAMPLES = 1_281_167  # ImageNet-1k train size, the synthetic epoch length unless num_samples is set


@dataclasses.dataclass(frozen=True)
class Plan:
    """One rank's epoch: `batches` batches of `batch` samples (the last of `last`), the same count on every rank."""
    rank: int
    world: int
    seed: int
    batch: int
    batches: int
    last: int
    drop_last: bool            # False: the ranks wrap around the samples to the same length
    size: int                  # image side, for sources that give finished images
    resample: bool = False     # streams: draw the shards with replacement
    shuffle_buffer: int = 1000  # streams: samples per reader

    def length(self, b):
        return self.last if b == self.batches - 1 else self.batch


class Source:
    """Base of every source; the class attributes say what it needs and gives."""
    name = None            # set by SOURCES.register
    needs_path = False     # True: `path` (a directory, shard pattern, ...) is required
    ready = False          # True: batches() gives finished uint8 images (no files for evaluation's transforms)
    workers_pick_samples = False  # True: the number of readers decides which samples a batch holds
    takes_index = False    # True: reads `index` (data.index: a dataset index or list file, index.py)
    classes = None         # class names (label k = classes[k]) when the source knows them

    def __init__(self, path=None, *, split="train", num_samples=None, samples_key="data.num_samples", index=None,
                 allow_missing=False):
        # split: "train" | "val" (sources with both); num_samples: the epoch size where the source cannot count it,
        # set by the recipe key `samples_key`; index: a dataset index or list file (takes_index); allow_missing:
        # leave out the files a list file names that are not there (said) instead of refusing
        self.path, self.split, self.num_samples, self.samples_key = path, split, num_samples, samples_key
        self.index_file, self.allow_missing = index, allow_missing

    @classmethod
    def index_problem(cls, index):
        """None when the source takes `index` (or it is None), else "expected ..., got ..."."""
        if index is not None and not cls.takes_index:
            return f"expected null: source {cls.name!r} reads no index (imagefolder does), got {index!r}"
        return None

    @classmethod
    def path_problem(cls, path):
        """None when `path` suits the source, else "expected ..., got ..."."""
        if cls.needs_path and not (isinstance(path, str) and path):
            return f"expected a directory or shard pattern for source {cls.name!r}, got {path!r}"
        if path is not None and not isinstance(path, str):
            return f"expected a string or null, got {path!r}"
        return None

    def check(self, plan, workers, epoch):
        """Raise here, in the main process, what batches() would raise in a worker."""

    def label_problem(self, num_classes):
        """None when every label the source knows without reading its samples is in [0, num_classes) (or it knows
        none), else "<label> for <sample> (...)": checked before training, where a bad label would stop a step."""
        return None

    def identity(self):
        """What the source holds, when it knows without reading it ({"files", "content"}: recorded in checkpoints;
        a resume on other data is said), else None."""
        return None

    def batches(self, plan, epoch, skip, worker, workers):
        """(b, [(name, bytes or why not, label)]) or, when `ready`, (b, (uint8 images, labels)) for the batches
        b >= skip of this rank that are this worker's (b = skip + worker, every `workers`-th)."""
        raise NotImplementedError

    def __str__(self):
        return self.path or self.name


class FileSource(Source):
    """Samples by index: len() and sample(i) -> (name, image bytes or a str saying why not, label)."""

    def sample(self, i):
        raise NotImplementedError

    def batches(self, plan, epoch, skip, worker, workers):
        # batch b is fixed by (seed, epoch, rank, b) whatever the number of workers
        idx = sources.rank_indices(len(self), plan.rank, plan.world, plan.seed, epoch, plan.drop_last)
        for b in range(skip + worker, plan.batches, workers):
            start = b * plan.batch
            yield b, [self.sample(i) for i in idx[start:start + plan.length(b)]]


class StreamSource(Source):
    """Samples as one stream per (rank, worker) reader: stream() for training, part() for evaluation."""
    workers_pick_samples = True

    def stream(self, rank, world, worker, workers, seed, epoch, resample, shuffle_buffer):
        """Endless (name, bytes or why not, label) of one reader, the same count for every rank."""
        raise NotImplementedError

    def part(self, rank, world, worker, workers):
        """This reader's share of the samples, each sample once over all readers."""
        raise NotImplementedError

    def batches(self, plan, epoch, skip, worker, workers):
        stream = self.stream(plan.rank, plan.world, worker, workers, plan.seed, epoch, plan.resample,
                             plan.shuffle_buffer)
        for b in range(worker, plan.batches, workers):
            raw = [next(stream) for _ in range(plan.length(b))]
            if b >= skip:  # skipped batches are read but not decoded: the stream stays where it would be
                yield b, raw


@SOURCES.register("imagefolder")
class ImageFolder(FileSource):
    """An ImageFolder tree at `path`: one class per sub-directory, or image files directly under it (label -1);
    its files come from the dataset index (index.py: listed once per run, or never when the index is there; an
    mmpretrain list file as `index`), mapped read-only, so workers share it and copy nothing."""
    needs_path = True
    takes_index = True

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.index = open_index(path, self.index_file, self.allow_missing)
        self.classes = self.index.classes

    def label_problem(self, num_classes):
        labels = self.index.labels
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes)) if len(labels) else []
        if not len(bad):
            return None
        i = int(bad[0])
        more = f" and {len(bad) - 1:,} more" if len(bad) > 1 else ""
        return f"{int(labels[i])}{' (unlabelled)' if labels[i] == -1 else ''} for {self.index.name(i)!r}{more}"

    def identity(self):
        return {"files": len(self.index), "content": digest_of(self.index.header)}

    def __len__(self):
        return len(self.index)

    def sample(self, i):
        path = os.path.join(self.path, self.index.name(i))
        try:
            data = sources.read_file(path)
        except OSError as e:  # a bad sample, not the end of the run
            data = f"cannot read: {e}"
        return path, data, int(self.index.labels[i])


@SOURCES.register("demo")
class Demo(ImageFolder):
    """The bundled demo photographs (demo.demo_root(): 400 crops, one class per photograph); no path."""
    needs_path = False
    takes_index = False

    def __init__(self, path=None, **kw):
        super().__init__(str(demo.demo_root()), **kw)


@SOURCES.register("digits")
class Digits(ImageFolder):
    """scikit-learn's digits as 32 px PNGs (demo.digits_root(split)), the evaluation demo's set; no path."""
    needs_path = False
    takes_index = False

    def __init__(self, path=None, *, split="train", **kw):
        super().__init__(str(demo.digits_root(split)), split=split, **kw)


@SOURCES.register("webdataset")
class WebDataset(StreamSource):
    """WebDataset tar shards: a path, brace pattern, '::' list or `pipe:` command (see sources.py)."""
    needs_path = True

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.urls = sources.expand_shards(path)
        if sources.is_remote(self.urls[0]):  # a missing shard or failing command: say so, not "num_samples"
            sources.check_readable(self.urls[0])

    def __len__(self):
        if self.num_samples:
            return self.num_samples
        counts, why = sources.shard_counts(self.urls)
        if counts is None:
            raise UserError(f"{self.samples_key}: required for shards without {sources.INFO_NAME} ({why}); "
                            f"write shards with `python -m mff_ds.data.make_shards`")
        return sum(counts)

    def check(self, plan, workers, epoch):
        if not plan.resample:  # too few shards for the readers
            next(sources.worker_passes(self.urls, plan.rank, plan.world, 0, workers, plan.seed, epoch, False))

    def stream(self, rank, world, worker, workers, seed, epoch, resample, shuffle_buffer):
        return sources.sample_stream(self.urls, rank, world, worker, workers, seed, epoch, resample, shuffle_buffer)

    def part(self, rank, world, worker, workers):
        return (s for url in self.urls[rank::world][worker::workers] for s in sources.iter_shard(url))


@SOURCES.register("synthetic")
class Synthetic(Source):
    """Random uint8 images, label -1, no files: the epoch is num_samples long (ImageNet-1k's size by default)."""
    ready = True

    def __len__(self):
        return self.num_samples or SYNTHETIC_SAMPLES

    def batches(self, plan, epoch, skip, worker, workers):
        for b in range(skip + worker, plan.batches, workers):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [plan.seed, epoch, plan.rank, b]).generate_state(1)[0]))
            n = plan.length(b)
            images = torch.randint(0, 256, (n, 3, plan.size, plan.size), dtype=torch.uint8, generator=g)
            yield b, (images, torch.full((n,), -1, dtype=torch.int64))


def source_for_path(path):
    """The source that reads `path` when only a path is given (benchmarks, `mff-eval --val`): the name of a source
    without a path ("demo", "digits", "synthetic"), a directory (imagefolder), else shards (webdataset)."""
    if path in SOURCES and not SOURCES.get(path).needs_path:
        return path
    return "imagefolder" if os.path.isdir(path) else "webdataset"
