"""Classification data: ImageFolder (torchvision) or WebDataset shards (`.jpg`/`.png` + `.cls`), timm transforms.

Unlike pretraining (uint8 batches from mff_ds.data), the downstream recipes need PIL-level augmentation
(RandAugment, random erasing), so batches here are normalised float tensors built by timm / torchvision:
- fine-tune train: RandomResizedCrop(bicubic) -> flip -> RandAugment -> normalise -> RandomErasing
  (`timm.data.create_transform(is_training=True, ...)`), then timm Mixup/CutMix on the batch;
- linear-probe train: RandomResizedCrop(bicubic) -> flip -> normalise (MAE main_linprobe);
- validation: resize the short side to size / crop_pct (bicubic), center crop, normalise.

Training order: every rank takes a fixed slice of one seeded permutation per epoch (equal length on every rank,
drop_last), so `skip_batches` resumes mid-epoch at the exact sample. Validation: each sample exactly once over
all ranks (ImageFolder: rank::world; shards: split by rank and worker).
"""
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mff_ds.data import IMAGENET_MEAN, IMAGENET_STD
from mff_ds.data import sources

MEAN = tuple(m / 255 for m in IMAGENET_MEAN)
STD = tuple(s / 255 for s in IMAGENET_STD)


# ------------------------------------------------------------------ transforms
def _posterize(img, bits_to_keep, **kw):
    """timm's posterize, defined for 0 bits again: RandAugment 'inc1' at magnitude 10 (reached with mstd 0.5)
    asks for 0 bits, which Pillow >= 13 rejects; older Pillow, which timm was written for, returned black."""
    from PIL import Image
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kw)


def _patch_timm_posterize():
    global _timm_posterize
    from timm.data import auto_augment as aa
    if aa.NAME_TO_OP.get("PosterizeIncreasing") is not _posterize:
        _timm_posterize = aa.posterize
        for k in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
            aa.NAME_TO_OP[k] = _posterize


def train_transform(task: str, img_size: int, aug):
    from timm.data import create_transform
    _patch_timm_posterize()
    if task == "finetune":
        return create_transform(img_size, is_training=True, scale=tuple(aug.crop_scale), hflip=aug.hflip,
                                auto_augment=aug.auto_augment, interpolation=aug.interpolation, re_prob=aug.reprob,
                                re_mode=aug.remode, re_count=1, color_jitter=None, mean=MEAN, std=STD)
    from torchvision import transforms as T
    interp = T.InterpolationMode(aug.interpolation)
    return T.Compose([T.RandomResizedCrop(img_size, scale=tuple(aug.crop_scale), interpolation=interp),
                      T.RandomHorizontalFlip(aug.hflip), T.ToTensor(), T.Normalize(MEAN, STD)])


def val_transform(img_size: int, aug):
    from timm.data import create_transform
    return create_transform(img_size, is_training=False, interpolation=aug.val_interpolation,
                            crop_pct=aug.val_crop_pct, mean=MEAN, std=STD)


# ------------------------------------------------------------------ samplers
class RankSampler(Sampler):
    """Training indices of one rank: a seeded permutation per epoch, rank-th of every world, drop_last,
    starting after `skip` samples (exact mid-epoch resume)."""

    def __init__(self, n, rank, world, seed, batch):
        self.n, self.rank, self.world, self.seed, self.batch = n, rank, world, seed, batch
        self.epoch, self.skip = 0, 0
        self.per_rank = (n // world) // batch * batch

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches * self.batch

    def __iter__(self):
        idx = sources.rank_indices(self.n, self.rank, self.world, self.seed, self.epoch, drop_last=True)
        return iter(idx[self.skip:self.per_rank].tolist())

    def __len__(self):
        return max(self.per_rank - self.skip, 0)


class _ShardSet(torch.utils.data.IterableDataset):
    """WebDataset shards -> (image tensor, label). train: endless seeded resampling of shards, per-worker quota;
    val: shards split over ranks and workers, each sample once."""

    def __init__(self, urls, transform, rank, world, seed, train, quota=None):
        self.urls, self.transform, self.rank, self.world = urls, transform, rank, world
        self.seed, self.train, self.quota, self.epoch = seed, train, quota, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch = epoch  # shards: resume is epoch-exact, not sample-exact

    def __iter__(self):
        import io

        from PIL import Image
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.train:
            stream = sources.sample_stream(self.urls, self.rank, self.world, w, nw, self.seed, self.epoch,
                                           resample=True, shuffle_buffer=1000)
            quota = self.quota // nw + (w < self.quota % nw)
        else:
            mine = self.urls[self.rank::self.world][w::nw]
            stream = (s for u in mine for s in sources.iter_shard(u))
            quota = None
        n = 0
        for name, data, label in stream:
            if quota is not None and n >= quota:
                return
            if not isinstance(data, bytes) or label < 0:
                if not self.train:
                    raise ValueError(f"{name}: unreadable or unlabelled validation sample ({data if data else 'no image'})")
                continue
            with Image.open(io.BytesIO(data)) as im:
                yield self.transform(im.convert("RGB")), label
            n += 1


# ------------------------------------------------------------------ loaders
def _imagefolder(root, transform):
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data path: expected an ImageFolder directory, got {root!r}")
    return ImageFolder(root, transform=transform)


def dataset_paths(data):
    if data.source == "digits":
        from mff_ds.data.demo import digits_root
        return str(digits_root("train")), str(digits_root("val"))
    return data.train_path, data.val_path


def _count_shards(urls, given, what):
    counts, why = sources.shard_counts(urls)
    if counts is None and given is None:
        raise ValueError(f"data.{what}_samples: the shards have no _info.json ({why}); expected the sample count, "
                         f"got None")
    return given if given is not None else sum(counts)


def build_train_loader(data, transform, *, micro_batch, rank, world, seed):
    """-> (loader with .set_epoch(epoch, skip_batches) and len() = batches per epoch on this rank, classes)."""
    train_path, _ = dataset_paths(data)
    g = torch.Generator()
    kw = dict(num_workers=data.num_workers, pin_memory=data.pin_memory and torch.cuda.is_available(),
              persistent_workers=data.num_workers > 0, drop_last=True)
    if data.source == "webdataset":
        urls = sources.expand_shards(train_path)
        n = _count_shards(urls, data.train_samples, "train")
        per_rank = n // world // micro_batch * micro_batch
        ds = _ShardSet(urls, transform, rank, world, seed, train=True, quota=per_rank)
        loader = DataLoader(ds, batch_size=micro_batch, generator=g, **kw)
        return _Loader(loader, ds, per_rank // micro_batch, g, seed), None
    ds = _imagefolder(train_path, transform)
    sampler = RankSampler(len(ds), rank, world, seed, micro_batch)
    if sampler.per_rank == 0:
        raise ValueError(f"data.train_path: {len(ds)} images give no full micro-batch of {micro_batch} on each of "
                         f"{world} rank(s); expected a larger set or a smaller batch")
    loader = DataLoader(ds, batch_size=micro_batch, sampler=sampler, generator=g, **kw)
    return _Loader(loader, sampler, sampler.per_rank // micro_batch, g, seed), ds.classes


class _Loader:
    """Wraps a DataLoader: set_epoch(epoch, skip_batches), a per-epoch generator (worker seeds do not touch the
    global RNG, so checkpointed RNG state resumes exactly), len() = full batches per epoch."""

    def __init__(self, loader, epoch_target, batches, generator, seed):
        self.loader, self.target, self.batches, self.g, self.seed = loader, epoch_target, batches, generator, seed

    def set_epoch(self, epoch, skip_batches=0):
        self.target.set_epoch(epoch, skip_batches)
        self.g.manual_seed(int(np.random.SeedSequence([self.seed, epoch, skip_batches, 17]).generate_state(1)[0]))

    def __len__(self):
        return self.batches

    def __iter__(self):
        return iter(self.loader)


def build_val_loader(data, transform, *, batch, rank, world, path=None):
    """-> (loader over this rank's share of the validation set, classes or None)."""
    _, val_path = dataset_paths(data)
    val_path = path or val_path
    kw = dict(num_workers=min(data.num_workers, 4), pin_memory=data.pin_memory and torch.cuda.is_available())
    if data.source == "webdataset" or (path and not os.path.isdir(path)):
        urls = sources.expand_shards(val_path)
        ds = _ShardSet(urls, transform, rank, world, 0, train=False)
        return DataLoader(ds, batch_size=batch, **kw), None
    ds = _imagefolder(val_path, transform)
    idx = list(range(rank, len(ds), world))
    return DataLoader(torch.utils.data.Subset(_SkipUnreadable(ds), idx), batch_size=batch, shuffle=False,
                      collate_fn=_collate_readable, **kw), ds.classes


class _SkipUnreadable(torch.utils.data.Dataset):
    """Validation ImageFolder: an unreadable image is left out and named on stderr instead of ending the evaluation
    (pretraining likewise replaces and counts its bad files); `val_samples` in the results counts what was scored."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds[i]
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            print(f"warning: skipped unreadable validation image {self.ds.samples[i][0]}: {e}", file=sys.stderr,
                  flush=True)
            return None


def _collate_readable(batch):
    """default_collate over the readable samples; None when none of the batch is (metrics.evaluate skips it)."""
    from torch.utils.data import default_collate
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None
