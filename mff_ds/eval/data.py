"""Classification data: any registered source that gives image files (mff_ds.data.SOURCES: imagefolder, digits,
webdataset shards with `.jpg`/`.png` + `.cls`, ...), decoded with PIL, through the registered transforms.

Unlike pretraining (uint8 batches from mff_ds.data), the downstream recipes need PIL-level augmentation
(RandAugment, random erasing), so batches here are normalised float tensors built by timm / torchvision, the
transforms registered in `TRANSFORMS` (one per task for training, "val"):
- fine-tune train: RandomResizedCrop(bicubic) -> flip -> RandAugment -> normalise -> RandomErasing
  (`timm.data.create_transform(is_training=True, ...)`), then timm Mixup/CutMix on the batch;
- linear-probe train: RandomResizedCrop(bicubic) -> flip -> normalise (MAE main_linprobe);
- validation: resize the short side to size / crop_pct (bicubic), center crop, normalise.

Training order: file sources: every rank takes a fixed slice of one seeded permutation per epoch (equal length on
every rank, drop_last), so `skip_batches` resumes mid-epoch at the exact sample; stream sources (shards): seeded
resampled streams, resumed at the epoch. Validation: each sample exactly once over all ranks (files: rank::world;
streams: split by rank and worker).
"""
import io
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from mff_ds.common import Registry, UserError
from mff_ds.data import IMAGENET_MEAN, IMAGENET_STD, SOURCES, source_for_path
from mff_ds.data import sources
from mff_ds.data.registry import FileSource

MEAN = tuple(m / 255 for m in IMAGENET_MEAN)
STD = tuple(s / 255 for s in IMAGENET_STD)


# ------------------------------------------------------------------ transforms
def _posterize(img, bits_to_keep, **kw):
    """timm's posterize, defined for 0 bits again: RandAugment 'inc1' at magnitude 10 (reached with mstd 0.5)
    asks for 0 bits, which Pillow >= 13 rejects; older Pillow, which timm was written for, returned black."""
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


TRANSFORMS = Registry("eval transform")  # (img_size, AugConfig) -> PIL image -> tensor; training: by task name


@TRANSFORMS.register("finetune")
def _finetune(img_size: int, aug):
    from timm.data import create_transform
    _patch_timm_posterize()
    return create_transform(img_size, is_training=True, scale=tuple(aug.crop_scale), hflip=aug.hflip,
                            auto_augment=aug.auto_augment, interpolation=aug.interpolation, re_prob=aug.reprob,
                            re_mode=aug.remode, re_count=1, color_jitter=None, mean=MEAN, std=STD)


@TRANSFORMS.register("linprobe")
def _linprobe(img_size: int, aug):
    from torchvision import transforms as T
    interp = T.InterpolationMode(aug.interpolation)
    return T.Compose([T.RandomResizedCrop(img_size, scale=tuple(aug.crop_scale), interpolation=interp),
                      T.RandomHorizontalFlip(aug.hflip), T.ToTensor(), T.Normalize(MEAN, STD)])


@TRANSFORMS.register("val")
def _val(img_size: int, aug):
    from timm.data import create_transform
    return create_transform(img_size, is_training=False, interpolation=aug.val_interpolation,
                            crop_pct=aug.val_crop_pct, mean=MEAN, std=STD)


def train_transform(task: str, img_size: int, aug):
    return TRANSFORMS.get(task)(img_size, aug)


def val_transform(img_size: int, aug):
    return TRANSFORMS.get("val")(img_size, aug)


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


def _pil(data):
    """Image bytes -> RGB PIL image (what torchvision's ImageFolder loader gives)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class _FileSet(torch.utils.data.Dataset):
    """A file source -> (transformed image, label) by index. skip_unreadable (validation): an unreadable image is
    left out (None) and named on stderr instead of ending the evaluation (pretraining likewise replaces and counts
    its bad files); `val_samples` in the results counts what was scored."""

    def __init__(self, source, transform, skip_unreadable=False):
        self.source, self.transform, self.skip_unreadable = source, transform, skip_unreadable

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        name, data, label = self.source.sample(i)
        try:
            if not isinstance(data, bytes):  # the source's reason (e.g. "cannot read: ...")
                raise OSError(data)
            image = _pil(data)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            why = "not an image" if isinstance(e, Image.UnidentifiedImageError) else e
            if not self.skip_unreadable:
                raise UserError(f"{name}: unreadable image ({why})") from e
            print(f"warning: skipped unreadable validation image {name}: {why}", file=sys.stderr, flush=True)
            return None
        return self.transform(image), label


class _StreamSet(torch.utils.data.IterableDataset):
    """A stream source (shards) -> (image tensor, label). train: the source's endless seeded resampled streams,
    per-worker quota; val: its samples split over ranks and workers, each once."""

    def __init__(self, source, transform, rank, world, seed, train, quota=None):
        self.source, self.transform, self.rank, self.world = source, transform, rank, world
        self.seed, self.train, self.quota, self.epoch = seed, train, quota, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch = epoch  # streams: resume is epoch-exact, not sample-exact

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.train:
            stream = self.source.stream(self.rank, self.world, w, nw, self.seed, self.epoch, resample=True,
                                        shuffle_buffer=1000)
            quota = self.quota // nw + (w < self.quota % nw)
        else:
            stream, quota = self.source.part(self.rank, self.world, w, nw), None
        n = 0
        for name, data, label in stream:
            if quota is not None and n >= quota:
                return
            if not isinstance(data, bytes) or label < 0:
                if not self.train:
                    raise UserError(f"{name}: unreadable or unlabelled validation sample ({data if data else 'no image'})")
                continue
            yield self.transform(_pil(data)), label
            n += 1


# ------------------------------------------------------------------ loaders
def open_source(data, split):
    """The registered source `data.source` (EvalData) for `split`: "train" | "val"."""
    return SOURCES.get(data.source)(getattr(data, f"{split}_path"), split=split,
                                    num_samples=getattr(data, f"{split}_samples"),
                                    samples_key=f"data.{split}_samples", index=getattr(data, f"{split}_index"),
                                    allow_missing=getattr(data, "allow_missing", False))


def build_train_loader(data, transform, *, micro_batch, rank, world, seed):
    """-> (loader with .set_epoch(epoch, skip_batches) and len() = batches per epoch on this rank, the source)."""
    source = open_source(data, "train")
    g = torch.Generator()
    kw = dict(num_workers=data.num_workers, pin_memory=data.pin_memory and torch.cuda.is_available(),
              persistent_workers=data.num_workers > 0, drop_last=True)
    if isinstance(source, FileSource):
        sampler = RankSampler(len(source), rank, world, seed, micro_batch)
        if sampler.per_rank == 0:
            raise UserError(f"data.train_path: {len(source)} images give no full micro-batch of {micro_batch} on "
                            f"each of {world} rank(s); expected a larger set or a smaller batch")
        loader = DataLoader(_FileSet(source, transform), batch_size=micro_batch, sampler=sampler, generator=g, **kw)
        return _Loader(loader, sampler, sampler.per_rank // micro_batch, g, seed), source
    per_rank = len(source) // world // micro_batch * micro_batch
    ds = _StreamSet(source, transform, rank, world, seed, train=True, quota=per_rank)
    loader = DataLoader(ds, batch_size=micro_batch, generator=g, **kw)
    return _Loader(loader, ds, per_rank // micro_batch, g, seed), source


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
    """-> (loader over this rank's share of the validation set, or of `path` (a directory or shards), the source)."""
    source = SOURCES.get(source_for_path(path))(path, split="val") if path else open_source(data, "val")
    return source_loader(data, source, transform, batch=batch, rank=rank, world=world)


def source_loader(data, source, transform, *, batch, rank, world):
    """-> (loader over this rank's share of `source`, each sample once over all ranks, the source)."""
    kw = dict(num_workers=min(data.num_workers, 4), pin_memory=data.pin_memory and torch.cuda.is_available())
    if isinstance(source, FileSource):
        ds = torch.utils.data.Subset(_FileSet(source, transform, skip_unreadable=True),
                                     list(range(rank, len(source), world)))
        return DataLoader(ds, batch_size=batch, shuffle=False, collate_fn=_collate_readable, **kw), source
    ds = _StreamSet(source, transform, rank, world, 0, train=False)
    return DataLoader(ds, batch_size=batch, **kw), source


def _collate_readable(batch):
    """default_collate over the readable samples; None when none of the batch is (metrics.evaluate skips it)."""
    from torch.utils.data import default_collate
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None
