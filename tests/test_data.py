"""Data pipeline: config, augmentations, decoding of odd/bad files, determinism/resume/equal split, demo data."""
import io
import os
import struct
import sys
import zlib

import numpy as np
import pydantic
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from conftest import REPO, tiny_recipe
from mff_ds.common import UserError
from mff_ds.data import BadDataError, BadImage, DataConfig, build_loader, decode_rgb, normalize
from mff_ds.data import decode as device_decode, demo, sources
from mff_ds.data.make_shards import convert
from mff_ds.data.transforms import LazyImage, MAECrop, MFFCrop, chw, make_augment, process
from mff_ds.schema import problems_of

S = 32  # output size used throughout (small: fast tests)


# ------------------------------------------------------------------------------------------------ helpers
def jpeg(im, **kw):
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def png(im, **kw):
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    return b.getvalue()


def png16_rgb(a):
    """Minimal 16-bit RGB PNG encoder (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory):
    old = os.environ.get("MFF_DS_CACHE")
    os.environ["MFF_DS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MFF_DS_CACHE")
    else:
        os.environ["MFF_DS_CACHE"] = old


@pytest.fixture(scope="session")
def photo():
    return demo.photos()["coffee"]  # 600x400 real photograph


@pytest.fixture(scope="session")
def folder(tmp_path_factory, photo):
    """ImageFolder: 3 classes, 31 JPEGs of 40-90 px cut from a real photograph."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(31):
        w, h = (int(v) for v in rng.integers(40, 91, size=2))
        x, y = int(rng.integers(0, 600 - 2 * w)), int(rng.integers(0, 400 - 2 * h))
        d = root / f"c{i % 3}"
        d.mkdir(exist_ok=True)
        (d / f"{i:03d}.jpg").write_bytes(jpeg(photo.resize((w, h), box=(x, y, x + 2 * w, y + 2 * h))))
    return root


@pytest.fixture(scope="session")
def shards(tmp_path_factory, folder):
    """5 uneven shards (7, 7, 7, 7, 3 samples) of the folder."""
    out = tmp_path_factory.mktemp("shards")
    convert(str(folder), str(out), shard_size=7, progress=False)
    return str(out / "train-{000000..000004}.tar")


def stream(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def load(cfg, **kw):
    # decode: gpu runs on the CUDA device when there is one, else on the CPU (the same code)
    args = dict(img_size=S, micro_batch=4, rank=0, world_size=1, seed=3, epoch=0,
                device=None if torch.cuda.is_available() else "cpu")
    args.update(kw)
    return build_loader(cfg, **args)


# ------------------------------------------------------------------------------------------ config, normalize
def data_problems(**kw):
    try:
        DataConfig(**kw)
    except pydantic.ValidationError as e:
        return problems_of(e, DataConfig, prefix="data.")
    return []


def test_validate_names_keys():
    assert data_problems() == []
    problems = data_problems(source="lmdb", augment="rrc", num_workers=-1, pin_memory="yes", max_bad_fraction=2,
                             num_samples=0, decode="tpu", shuffle_buffer=float("inf"))
    for key in ("source", "augment", "num_workers", "pin_memory", "max_bad_fraction", "num_samples", "decode",
                "shuffle_buffer"):
        assert any(p.startswith(f"data.{key}:") for p in problems), (key, problems)
    assert "data.augment: expected one of ['mff', 'mae', 'center'], got 'rrc'" in problems
    assert any(p.startswith("data.path:") for p in data_problems(source="imagefolder"))
    with pytest.raises(UserError, match="data.augment"):
        load(dict(augment="rrc", source="synthetic"))


def test_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.device == x.device
    torch.testing.assert_close(y, (x.float() - mean) / std)
    assert normalize(x, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.float())


# -------------------------------------------------------------------------------------------- augmentations
def _ref(aug, pil, p):
    """torchvision (PIL) reference for augmentation parameters p."""
    if isinstance(aug, MFFCrop):
        nw, nh, top, left, flip = p
        out = TF.resize(pil, S)
        assert out.size == (nw, nh)
        out = TF.crop(TF.pad(out, 4, padding_mode="reflect"), top + 4, left + 4, S, S)
    elif isinstance(aug, MAECrop):
        _, _, i, j, ch, cw, flip = p
        out = TF.resized_crop(pil, i, j, ch, cw, [S, S], InterpolationMode.BICUBIC)
    else:
        flip = False
        out = TF.center_crop(TF.resize(pil, int(S / 0.875), InterpolationMode.BICUBIC), S)
    out = TF.hflip(out) if flip else out
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


@pytest.mark.parametrize("name", ["mff", "mae", "center"])
def test_augment_matches_torchvision(name, photo):
    aug = make_augment(name, S)
    for k, (w, h) in enumerate([(75, 50), (50, 90), (64, 64), (120, 33)]):
        data = jpeg(photo.resize((w, h), box=(10 * k, 0, 10 * k + 3 * w, 3 * h)))
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        p = aug.sample(w, h, np.random.default_rng(k))
        for fast in (False, True):  # fast: libjpeg-turbo, maybe at 1/2 size: close, not equal
            out = process(data, aug, np.random.default_rng(k), fast=fast)
            assert out.shape == (3, S, S) and out.dtype == torch.uint8
            diff = (out.int() - _ref(aug, pil, p).int()).abs()
            if fast:
                assert diff.float().mean() < 3, (name, w, h)
            else:
                assert diff.max() <= 2 and diff.float().mean() < 0.4, (name, w, h)  # rounding only


def test_crop_and_flip_statistics():
    rng, n = np.random.default_rng(0), 4000
    mff = np.array([MFFCrop(64).sample(300, 200, rng) for _ in range(n)], dtype=float)  # resized to 96x64
    assert (mff[:, 0] == 96).all() and (mff[:, 1] == 64).all()
    top, left, flip = mff[:, 2], mff[:, 3], mff[:, 4]
    assert top.min() == -4 and top.max() == 4 and abs(top.mean()) < 0.3          # uniform on [-4, 4]
    assert left.min() == -4 and left.max() == 36 and abs(left.mean() - 16) < 1   # uniform on [-4, 36]
    assert abs(flip.mean() - 0.5) < 0.04

    mae = np.array([MAECrop(64).sample(400, 300, rng) for _ in range(n)], dtype=float)
    i, j, ch, cw, flip = mae[:, 2], mae[:, 3], mae[:, 4], mae[:, 5], mae[:, 6]
    area, aspect = ch * cw / (400 * 300), cw / ch
    assert area.min() > 0.19 and area.max() <= 1 and aspect.min() > 0.74 and aspect.max() < 1.34
    assert (i >= 0).all() and (i + ch <= 300).all() and (j >= 0).all() and (j + cw <= 400).all()
    assert abs(flip.mean() - 0.5) < 0.04
    torch.manual_seed(0)  # same distribution as torchvision's RandomResizedCrop
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, 300, 400), [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(n)], dtype=float)
    ref_area = ref[:, 2] * ref[:, 3] / (400 * 300)
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    assert abs((i + ch / 2).mean() - (ref[:, 0] + ref[:, 2] / 2).mean()) < 5


def test_flip_is_mirror(photo):
    data = jpeg(photo.resize((80, 60)))
    for name in ("mff", "mae"):
        aug = make_augment(name, S)
        p = list(aug.sample(80, 60, np.random.default_rng(1)))
        arr = chw(decode_rgb(data))
        a = aug.apply(arr, tuple(p[:-1] + [False]))
        b = aug.apply(arr, tuple(p[:-1] + [True]))
        assert torch.equal(a.flip(-1), b) and not torch.equal(a, b)


def test_reduced_size_decode(photo):
    big = photo.resize((1200, 800), Image.BICUBIC)
    data = jpeg(big)
    image = LazyImage(data, fast=True)
    assert image.size == (1200, 800) and image.decode(150, 100).shape == (100, 150, 3)  # 1/8 in the DCT domain
    assert image.decode(301, 200).shape == (400, 600, 3)                               # 1/2 (1/4 is too small)
    pil = LazyImage(jpeg(big.convert("L")), fast=True)                               # gray also fast
    assert pil.decode(150, 100).shape == (100, 150, 3)
    for name in ("mff", "mae", "center"):
        aug = make_augment(name, 64)
        fast = process(data, aug, np.random.default_rng(5), fast=True)
        exact = process(data, aug, np.random.default_rng(5), fast=False)
        assert (fast.float() - exact.float()).abs().mean() < 4, name  # same crop, close pixels


# -------------------------------------------------------------------------------------------------- bad data
def odd_files(photo):
    rgb = photo.resize((64, 48))
    good = jpeg(rgb)
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotated 90 degrees clockwise
    half = Image.new("RGB", (40, 20), (0, 0, 255))
    half.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    g16 = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    c16 = np.stack([g16, 65535 - g16, g16 // 2], -1)
    return {
        "gray.jpg": jpeg(rgb.convert("L")),
        "cmyk.jpg": jpeg(Image.new("CMYK", (64, 48), (0, 255, 255, 0))),  # red
        "palette.png": png(pal, transparency=0),
        "gray16.png": png(Image.fromarray(g16)),
        "rgb16.png": png16_rgb(c16),
        "exif.jpg": jpeg(half, exif=exif.tobytes()),
        "bad_truncated.jpg": good[:len(good) // 2],
        "bad_corrupt.jpg": good[:200] + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
        "bad_notimage.jpg": b"<html><body>404 not found</body></html>",
    }, (pal, g16, c16)


@pytest.mark.parametrize("fast", [True, False])
def test_decode_converts_or_rejects(photo, fast):
    files, (pal, g16, c16) = odd_files(photo)
    for name, data in files.items():
        if name.startswith("bad_"):
            with pytest.raises(BadImage):
                decode_rgb(data, fast=fast)
            continue
        a = decode_rgb(data, fast=fast)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, name
        if name == "gray.jpg":
            assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
        elif name == "cmyk.jpg":
            assert a[..., 0].min() > 200 and a[..., 1:].max() < 60
        elif name == "palette.png":
            np.testing.assert_array_equal(a, np.asarray(pal.convert("RGB")))
        elif name == "gray16.png":
            np.testing.assert_array_equal(a[..., 0], g16 >> 8)
        elif name == "rgb16.png":
            np.testing.assert_array_equal(a, (c16 >> 8).astype(np.uint8))
        elif name == "exif.jpg":
            assert a.shape == (40, 20, 3)  # rotated to portrait, red half now on top
            assert a[5, 10, 0] > 200 and a[5, 10, 2] < 60 and a[35, 10, 2] > 200 and a[35, 10, 0] < 60


@pytest.mark.parametrize("decode", ["cpu", "gpu"])  # gpu: the device path (on the CPU here), CPU fallbacks
def test_loader_skips_bad_files(tmp_path, photo, decode):
    files, _ = odd_files(photo)
    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    for name, data in files.items():
        (root / "a" / name).write_bytes(data)
    for k in range(15):
        (root / "a" / f"good{k}.jpg").write_bytes(jpeg(photo.resize((50 + k, 40), box=(9 * k, 0, 300, 200))))
    cfg = DataConfig(source="imagefolder", path=str(root), num_workers=1, max_bad_fraction=0.2, augment="mae",
                     decode=decode)
    loader = load(cfg, drop_last=False, micro_batch=5)
    batches = stream(loader)
    assert sum(len(y) for _, y in batches) == 24 and len(batches) == len(loader) == 5
    assert loader.bad_samples == 3 and loader.seen_samples == 24
    assert sorted(e.split(": ")[0].rsplit("/", 1)[1] for e in loader.bad_examples) == \
        ["bad_corrupt.jpg", "bad_notimage.jpg", "bad_truncated.jpg"]
    assert all((y == 0).all() for _, y in batches)  # replaced by good samples of the same batch
    records = loader.take_bad()  # each skipped sample: (epoch, batch, file, reason), for OUTPUT_DIR/bad_samples/
    assert sorted(r[2].rsplit("/", 1)[1] for r in records) == \
        ["bad_corrupt.jpg", "bad_notimage.jpg", "bad_truncated.jpg"]
    assert all(r[0] == 0 and 0 <= r[1] < 5 and r[3] for r in records) and loader.take_bad() == []

    strict = DataConfig(source="imagefolder", path=str(root), num_workers=0, max_bad_fraction=0.01, decode=decode)
    with pytest.raises(BadDataError, match=r"3 of 24 samples.*bad_"):
        stream(load(strict, drop_last=False, micro_batch=5))


# ------------------------------------------------------------------------------------ ImageFolder streams
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_imagefolder_determinism_resume_split(folder, decode):
    cfg0 = DataConfig(source="imagefolder", path=str(folder), num_workers=0, augment="mae", decode=decode)
    full = stream(load(cfg0))
    assert len(full) == 7 and all(x.shape == (4, 3, S, S) and x.dtype == torch.uint8 for x, _ in full)
    assert same(full, stream(load(cfg0)))
    assert not same(full, stream(load(cfg0, epoch=1)))
    assert same(full[3:], stream(load(cfg0, skip_batches=3)))
    cfg2 = DataConfig(source="imagefolder", path=str(folder), num_workers=2, augment="mae", decode=decode)
    loader = load(cfg2)
    assert same(full, stream(loader))                 # worker count does not change the stream
    loader.set_epoch(1, skip_batches=2)                # persistent workers, next epoch, resumed
    assert same(stream(load(cfg0, epoch=1))[2:], stream(loader))
    labels = torch.cat([y for _, y in full])
    assert set(labels.tolist()) == {0, 1, 2}
    # two ranks: equal lengths, disjoint samples
    idx = [sources.rank_indices(31, r, 2, 3, 0, True) for r in range(2)]
    assert len(idx[0]) == len(idx[1]) == 15 and not set(idx[0]) & set(idx[1])
    assert len(load(cfg0, rank=0, world_size=2)) == len(load(cfg0, rank=1, world_size=2)) == 3
    wrap = [load(cfg0, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert [len(w) for w in wrap] == [4, 4] and [len(torch.cat([y for _, y in stream(w)])) for w in wrap] == [16, 16]


def test_close_stops_the_persistent_workers(folder):
    import multiprocessing as mp
    import gc
    before = set(mp.active_children())
    loader = load(DataConfig(source="imagefolder", path=str(folder), num_workers=2, augment="mae"))
    stream(loader)
    workers = set(mp.active_children()) - before
    assert len(workers) == 2                            # persistent: alive between epochs
    gc.disable()                                        # the workers must stop on close(), not on a collection
    try:
        loader.close()
        assert not set(mp.active_children()) - before and all(not w.is_alive() for w in workers)
    finally:
        gc.enable()


def test_cpu_path_runs_process(folder):
    """Batch b of the CPU path is `process` over its samples in order, with the batch's generator: the function
    the augmentation tests check is the one the workers run."""
    loader = load(DataConfig(source="imagefolder", path=str(folder), num_workers=0, augment="mae", decode="cpu"),
                  rank=1, world_size=2, epoch=1)
    files = sorted(str(p) for p in folder.glob("*/*") if p.suffix in (".jpg", ".png"))  # class folders, sorted
    idx = sources.rank_indices(len(files), 1, 2, 3, 1, True)
    aug = make_augment("mae", S)
    for b, (x, _) in enumerate(stream(loader)):
        rng = np.random.default_rng([3, 1, 1, b])  # (seed, epoch, rank, batch)
        assert torch.equal(x, torch.stack([process(sources.read_file(files[i]), aug, rng)
                                           for i in idx[4 * b:4 * b + 4]]))


def test_unusable_data_is_a_user_error(tmp_path, folder, photo):
    """Data the user named that cannot serve: UserError (the command lines print one line and exit 2)."""
    def fails(match, path):
        with pytest.raises(UserError, match=match):
            load(DataConfig(source="imagefolder", path=str(path), num_workers=0))

    fails(r"data.path: ImageFolder root '\S+nowhere' is not a directory", tmp_path / "nowhere")
    fails("data.path: no image files", tmp_path)
    (tmp_path / "c0").mkdir()
    (tmp_path / "x.jpg").write_bytes(jpeg(photo))
    fails("mixes image files and class directories", tmp_path)
    with pytest.raises(UserError, match="31 samples over 8 ranks give 3 per rank, fewer than micro_batch=4"):
        load(DataConfig(source="imagefolder", path=str(folder)), world_size=8)
    assert issubclass(BadDataError, UserError)  # too many unreadable files


# --------------------------------------------------------------------------------------------- shard streams
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_shards_determinism_resume(shards, folder, decode):
    for nw in (0, 2):
        cfg = DataConfig(source="webdataset", path=shards, num_workers=nw, shuffle_buffer=5, decode=decode)
        full = stream(load(cfg))
        assert len(full) == 7
        assert same(full, stream(load(cfg)))
        assert not same(full, stream(load(cfg, epoch=1)))
        assert same(full[3:], stream(load(cfg, skip_batches=3)))   # odd skip: workers resume out of order
    # one reader, no truncation: an epoch is every sample exactly once
    cfg = DataConfig(source="webdataset", path=shards, num_workers=0, shuffle_buffer=5, augment="center")
    epoch = stream(load(cfg, micro_batch=1))
    labels = torch.cat([y for _, y in epoch])
    expected = sorted(int(p.parent.name[1:]) for p in folder.rglob("*.jpg"))
    assert sorted(labels.tolist()) == expected and len({x.numpy().tobytes() for x, _ in epoch}) == 31


@pytest.mark.parametrize("nw", [0, 2])
def test_shards_equal_batches_on_uneven_split(shards, nw):
    cfg = DataConfig(source="webdataset", path=shards, num_workers=nw, shuffle_buffer=3, augment="center")
    loaders = [load(cfg, rank=r, world_size=2, micro_batch=4) for r in range(2)]  # shards: 7+7+3 vs 7+7
    streams = [stream(x) for x in loaders]
    assert [len(x) for x in loaders] == [len(s) for s in streams] == [3, 3]
    seen = [{img.numpy().tobytes() for x, _ in s for img in x} for s in streams]  # "center": no randomness
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # ranks read disjoint shards


def test_too_few_shards(shards):
    cfg = DataConfig(source="webdataset", path=shards, num_workers=3)
    with pytest.raises(UserError, match="5 shards for 2 ranks x 3 workers.*resample_shards"):
        load(cfg, world_size=2)
    cfg = DataConfig(source="webdataset", path=shards, num_workers=0, resample_shards=True)
    loaders = [load(cfg, rank=r, world_size=8, micro_batch=2) for r in range(8)]
    assert all(len(stream(x)) == len(x) == 1 for x in loaders)
    with pytest.raises(UserError, match="expected existing shard files, got 2 of 2 missing"):
        load(DataConfig(source="webdataset", path=shards.replace("{000000..000004}", "x{0..1}")))
    other = shards.replace("train-{000000..000004}", "other-0")
    if not os.path.exists(other):
        os.link(shards.replace("{000000..000004}", "000000"), other)
    with pytest.raises(UserError, match="shard other-0.tar is not listed in .*_info.json"):
        load(DataConfig(source="webdataset", path=other))


def test_shards_without_info(shards, tmp_path):
    for i in range(2):
        os.link(shards.replace("{000000..000004}", f"{i:06d}"), tmp_path / f"s{i}.tar")
    pattern = str(tmp_path / "s{0..1}.tar")
    with pytest.raises(UserError, match="data.num_samples: required"):
        load(DataConfig(source="webdataset", path=pattern))
    loader = load(DataConfig(source="webdataset", path=pattern, num_samples=14, num_workers=0))
    assert len(loader) == 3 and sum(len(y) for _, y in loader) == 12


def test_pipe_shards(shards, folder, tmp_path):
    """`pipe:` urls: the same streams as the local paths (split by rank and worker, resume), the sample count
    from _info.json fetched through the same command, one clear line when shards or _info.json are missing."""
    pipe = "pipe:cat " + shards
    for nw in (0, 2):
        kw = dict(source="webdataset", num_workers=nw, shuffle_buffer=5, augment="mae")
        loader = load(DataConfig(path=pipe, **kw))
        assert loader.num_samples == 31 and len(loader) == 7
        full = stream(loader)
        assert same(full, stream(load(DataConfig(path=shards, **kw))))
        assert same(full[3:], stream(load(DataConfig(path=pipe, **kw), skip_batches=3)))
        ranks = [stream(load(DataConfig(path=pipe, **kw), rank=r, world_size=2)) for r in range(2)]
        assert all(same(a, stream(load(DataConfig(path=shards, **kw), rank=r, world_size=2)))
                   for r, a in enumerate(ranks))
    # the shard's file name is replaced in the command: `cd DIR && cat _info.json` (no local path to find)
    d, pattern = os.path.split(shards)
    assert load(DataConfig(source="webdataset", path=f"pipe:cd {d} && cat {pattern}", num_workers=0)).num_samples == 31
    for i in range(2):
        os.link(shards.replace("{000000..000004}", f"{i:06d}"), tmp_path / f"s{i}.tar")
    bare = f"pipe:cat {tmp_path}/s{{0..1}}.tar"
    with pytest.raises(UserError, match=r"data.num_samples: required .*pipe:cat \S+/_info.json: exit status 1"):
        load(DataConfig(source="webdataset", path=bare))
    assert len(load(DataConfig(source="webdataset", path=bare, num_samples=14, num_workers=0))) == 3
    missing = str(tmp_path / "nowhere" / "train-{000000..000003}.tar")
    with pytest.raises(UserError, match=r"data.path: cannot read shard 'pipe:cat \S+nowhere/train-000000.tar' "
                                         r"\(exit status 1: cat: .*No such file"):
        load(DataConfig(source="webdataset", path="pipe:cat " + missing))
    with pytest.raises(UserError, match=r"data.path: expected existing shard files, got 4 of 4 missing for .*, e.g. '\S+/train-000000.tar'"):
        load(DataConfig(source="webdataset", path=missing, num_samples=10))


# Device path vs CPU path, stated tolerance (grey levels): the same crop boxes and flips; pixels differ only by
# the resize arithmetic (float on the device path; torch's uint8 kernels round and clamp between the two
# passes, which shows after bicubic overshoot), and with fast_decode by the CPU path's reduced-size decoding.
TOLERANCE = {"mff": 2, "mae": 6, "center": 6}


@pytest.mark.parametrize("aug", ["mff", "mae", "center"])
def test_device_decode_matches_cpu_path(folder, aug):
    kw = dict(source="imagefolder", path=str(folder), num_workers=0, augment=aug, fast_decode=False)
    cpu = stream(load(DataConfig(decode="cpu", **kw), micro_batch=8))
    loader = load(DataConfig(decode="gpu", **kw), micro_batch=8, device="cpu")  # the device code, on the CPU
    dev = stream(loader)
    assert loader.device == torch.device("cpu") and len(cpu) == len(dev) == 3
    for (a, ya), (b, yb) in zip(cpu, dev):
        d = (a.int() - b.int()).abs()
        assert torch.equal(ya, yb) and b.dtype == torch.uint8 and d.max() <= TOLERANCE[aug] and d.float().mean() < 0.3
    # the same parameters, drawn in the workers, as the CPU path draws them
    ds = loader.dataset
    b, enc, *_ = ds._make(1, 0, [(str(p), p.read_bytes(), 0) for p in sorted(folder.rglob("*.jpg"))[:8]])
    rng = np.random.default_rng([ds.seed, 0, 0, 1])
    assert enc.params == [ds.aug.sample(*Image.open(p).size, rng) for p in sorted(folder.rglob("*.jpg"))[:8]]
    assert not enc.done  # every JPEG goes to the device
    fast = stream(load(DataConfig(decode="cpu", **dict(kw, fast_decode=True)), micro_batch=8))
    assert np.mean([(a.float() - b.float()).abs().mean().item() for (a, _), (b, _) in zip(fast, dev)]) < 4


def test_device_decode_routes_odd_files_to_the_cpu_decoder(photo):
    files, _ = odd_files(photo)
    files["rgb.jpg"], files["progressive.jpg"] = jpeg(photo), jpeg(photo, progressive=True)
    for name in ("rgb.jpg", "gray.jpg", "cmyk.jpg", "exif.jpg", "palette.png", "bad_truncated.jpg", "progressive.jpg"):
        ok = device_decode.nvjpeg_ok(files[name], LazyImage(files[name], True))
        assert ok == (name in ("rgb.jpg", "gray.jpg")), name  # the others: the CPU decoder, in the workers


def test_device_decode_falls_back_per_file(photo, folder):
    """A JPEG the batched device call rejects: the others still decode; the CPU path's decoder gets it and, as
    on the CPU path, counts it bad and replaces it by a good sample of the batch."""
    good = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:5]]
    whole = jpeg(photo)
    broken = whole[:2000] + bytes(range(256)) * 8 + whole[4048:]  # header and end marker intact
    raw = [(f"f{k}: a\tname", d, k) for k, d in enumerate(good[:2] + [broken] + good[2:])]
    cfg = DataConfig(source="imagefolder", path=str(folder), num_workers=0, decode="gpu")
    ds = load(cfg, device="cpu").dataset
    b, enc, labels, bad, n = ds._make(0, 0, raw)
    assert enc.params[2] is not None and not bad and not enc.done  # the worker sent it to the device
    imgs, labels, bad = device_decode.decode_batch(enc, labels, bad, ds.aug, ds.size, torch.device("cpu"))
    assert [(k, name) for k, name, _ in bad] == [(2, "f2: a\tname")] and bad[0][2]  # the name, the reason
    assert labels.tolist() == [0, 1, 3, 3, 4, 5] and torch.equal(imgs[2], imgs[3])


@pytest.mark.cuda
@pytest.mark.parametrize("aug", ["mff", "mae"])
def test_cuda_decode_matches_cpu_path(folder, aug):
    kw = dict(source="imagefolder", path=str(folder), num_workers=2, augment=aug, fast_decode=False)
    cpu = stream(load(DataConfig(decode="cpu", **kw), micro_batch=8))
    loader = load(DataConfig(decode="gpu", **kw), micro_batch=8, device="cuda")
    dev = stream(loader)
    assert len(dev) == 3 and all(x.is_cuda for x, _ in dev) and loader.bad_samples == 0
    for (a, _), (b, _) in zip(cpu, dev):  # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's
        assert (a.float() - b.cpu().float()).abs().mean() < 3
    assert same(dev, stream(load(DataConfig(decode="gpu", **kw), micro_batch=8, device="cuda")))


def test_synthetic_source():
    cfg = DataConfig(source="synthetic", num_samples=100, num_workers=0)
    loader = load(cfg, world_size=2, micro_batch=8)
    a = stream(loader)
    assert len(loader) == len(a) == 6 and a[0][0].shape == (8, 3, S, S) and a[0][0].dtype == torch.uint8
    assert (a[0][1] == -1).all() and a[0][0].float().std() > 50
    assert same(a, stream(load(cfg, world_size=2, micro_batch=8)))


# ------------------------------------------------------------------------------------------- source registry
def test_a_new_source_is_one_class_and_one_registration(monkeypatch, photo):
    """A source registered here (PNGs made in memory) serves pretraining and evaluation with no other change."""
    from mff_ds.data.registry import SOURCES, FileSource
    from mff_ds.eval.data import build_train_loader, train_transform
    from mff_ds.eval.recipe import AugConfig, EvalData
    monkeypatch.setattr(SOURCES, "_entries", dict(SOURCES._entries))  # the registration ends with the test

    @SOURCES.register("pngs")
    class Pngs(FileSource):
        classes = ["a", "b", "c"]

        def __init__(self, path=None, **kw):
            super().__init__(path, **kw)
            self.images = [png(photo.resize((40, 30), box=(30 * k, 0, 30 * k + 200, 150))) for k in range(12)]

        def __len__(self):
            return len(self.images)

        def sample(self, i):
            return f"png{i}", self.images[i], i % 3

    cfg = DataConfig(source="pngs", num_workers=0)
    batches = stream(load(cfg))
    assert len(batches) == 3 and sorted(torch.cat([y for _, y in batches]).tolist()) == sorted([0, 1, 2] * 4)
    assert same(batches[1:], stream(load(cfg, skip_batches=1)))
    data = EvalData(source="pngs", num_workers=0)  # an image source: evaluation takes it
    loader, source = build_train_loader(data, train_transform("linprobe", S, AugConfig()), micro_batch=4, rank=0,
                                        world=1, seed=0)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    assert source.classes == ["a", "b", "c"] and len(loader) == 3 and x.shape == (4, 3, S, S) and set(y.tolist()) <= {0, 1, 2}


def test_unknown_source_or_augment_is_one_line_naming_the_registered_ones():
    from mff_ds.data.registry import SOURCES
    names = SOURCES.names()
    assert {"imagefolder", "demo", "digits", "webdataset", "synthetic"} <= set(names)
    with pytest.raises(ValueError) as e:
        SOURCES.get("lmdb")
    assert str(e.value) == f"data source: expected one of {names}, got 'lmdb'"
    assert f"data.source: expected one of {names}, got 'lmdb'" in data_problems(source="lmdb")
    from mff_ds.engine.recipe import RecipeError
    from mff_ds.eval.recipe import from_dict
    images = [n for n in names if n != "synthetic"]  # evaluation's transforms need image files
    with pytest.raises(RecipeError) as e:
        from_dict({"model": {"arch": "mae_vit_tiny_patch16"}, "data": {"source": "synthetic"}})
    assert f"data.source: expected one of {images}, got 'synthetic'" in e.value.problems
    with pytest.raises(ValueError, match=r"^augment: expected one of \['mff', 'mae', 'center'\], got 'rrc'$"):
        make_augment("rrc", S)
    with pytest.raises(ValueError, match="data source: expected a new name, got 'demo'"):
        SOURCES.register("demo")(object)


# ------------------------------------------------------------------------------------------------ demo data
def test_demo_data():
    root = demo.demo_root()
    files = list(root.rglob("*.jpg"))
    assert len(files) == 400 and len({f.parent.name for f in files}) == 10
    sizes = [Image.open(f).size for f in files[:50]]
    assert all(96 <= w <= 160 and 96 <= h <= 160 for w, h in sizes)
    assert demo.demo_root() == root and not [p for p in root.parent.iterdir() if "tmp" in p.name]
    loader = load(DataConfig(num_workers=0), micro_batch=64)  # source="demo", augment="mff"
    x, y = next(iter(loader))
    assert len(loader) == 6 and x.shape == (64, 3, S, S) and x.float().std() > 20
    train, val = demo.digits_root("train"), demo.digits_root("val")
    n_train, n_val = len(list(train.rglob("*.png"))), len(list(val.rglob("*.png")))
    assert (n_train, n_val) == (1438, 359) and sorted(p.name for p in val.iterdir()) == [str(d) for d in range(10)]
    im = Image.open(next(train.rglob("*.png")))
    assert im.size == (32, 32) and im.mode == "RGB"
    with pytest.raises(ValueError, match="split"):
        demo.digits_root("test")


def _loop_stub(out):
    """What engine.trainer.timed / record_bad use of the training loop's state."""
    from types import SimpleNamespace
    return SimpleNamespace(view=SimpleNamespace(output_dir=str(out), rank=0), pos=SimpleNamespace(step=0),
                           bad_seen=None, data_wait=0.0)


def test_the_batch_that_stops_the_run_names_its_skipped_files(tmp_path, photo):
    """BadDataError comes out of the loader with the batch whose bad samples exceed max_bad_fraction: the files
    of that batch are named in bad_samples/rank000.tsv as well."""
    from mff_ds.engine.trainer import timed
    root = tmp_path / "odd" / "a"
    root.mkdir(parents=True)
    for k in range(2):
        (root / f"bad{k}.jpg").write_bytes(b"not an image")
        (root / f"good{k}.jpg").write_bytes(jpeg(photo.resize((50 + k, 40))))
    cfg = DataConfig(source="imagefolder", path=str(root.parent), num_workers=0, max_bad_fraction=0.01)
    s = _loop_stub(tmp_path / "out")
    with pytest.raises(BadDataError, match="2 of 4 samples"):
        list(timed(load(cfg, micro_batch=4), s))  # one batch: the check comes with it
    lines = (tmp_path / "out" / "bad_samples" / "rank000.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[3] for line in lines[1:]) == [str(root / "bad0.jpg"), str(root / "bad1.jpg")]

def test_skipped_files_are_named_exactly_whatever_their_names_and_reasons(tmp_path, photo, monkeypatch):
    """bad_samples/rank000.tsv gives back each skipped file's name and reason exactly: tabs, newlines, ': ',
    backslashes and bytes that are not UTF-8 in the name, a reason of several lines."""
    from mff_ds.data import loader as loader_module
    from mff_ds.engine import bad_samples
    from mff_ds.engine.trainer import timed
    root = tmp_path / "odd" / "a"
    root.mkdir(parents=True)
    names = ["x: y.jpg", "tab\there.jpg", "new\nline.jpg", "back\\slash\\n.jpg", "cr\r.jpg",
             os.fsdecode(b"\xff\xfe.jpg")]
    for name in names:
        (root / name).write_bytes(b"not an image")
    for k in range(2):
        (root / f"good{k}.jpg").write_bytes(jpeg(photo.resize((50 + k, 40))))
    process = loader_module.process

    def failing(data, *args):
        if data == b"not an image":
            raise ValueError("two\nlines\tand a tab")
        return process(data, *args)

    monkeypatch.setattr(loader_module, "process", failing)
    cfg = DataConfig(source="imagefolder", path=str(root.parent), num_workers=0, max_bad_fraction=0.9, decode="cpu")
    assert len(list(timed(load(cfg, micro_batch=8), _loop_stub(tmp_path / "out")))) == 1
    records = bad_samples.read(bad_samples.rank_file(str(tmp_path / "out"), 0))
    assert sorted(records) == sorted((1, 0, 0, str(root / name), "two\nlines\tand a tab") for name in names)


def test_a_run_names_every_skipped_sample_once_per_epoch(tmp_path, photo):
    """The console says one skipped file per 30 s; OUTPUT_DIR/bad_samples/rank000.tsv names every one, with the step
    that would have used it; a run killed mid-epoch after a skipped sample past its last checkpoint replays that
    stretch when resumed, and names no file twice."""
    import forkserver
    from test_engine_resume import WRAPPER

    from mff_ds.engine import bad_samples
    files, _ = odd_files(photo)
    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    for name in ("bad_truncated.jpg", "bad_corrupt.jpg", "bad_notimage.jpg"):
        (root / "a" / name).write_bytes(files[name])
    for k in range(13):
        (root / "a" / f"good{k}.jpg").write_bytes(jpeg(photo.resize((50 + k, 40), box=(9 * k, 0, 300, 200))))
    cfg = tmp_path / "r.yaml"  # 4 batches of 4 per epoch, one optimizer step each, a checkpoint after each
    cfg.write_text(tiny_recipe(data={"source": "imagefolder", "path": str(root), "num_workers": 0,
                                     "max_bad_fraction": 0.3, "num_samples": None},
                               batch={"global_batch": 4, "micro_batch": 4}, schedule={"epochs": 2, "warmup_epochs": 0},
                               checkpoint={"every_steps": 1, "keep_last": 2}))
    out, tsv = tmp_path / "out", tmp_path / "out" / "bad_samples" / "rank000.tsv"
    script = tmp_path / "pretrain.py"
    script.write_text(WRAPPER.format(repo=str(REPO), script=str(REPO / "launch" / "pretrain.py")))  # can kill itself
    cmd = [sys.executable, str(script), "--config", str(cfg), "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = forkserver.run(cmd, env=dict(env, CRASH="step:2:0"), capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-3000:]  # killed after step 2, saved 1: batch 1 of epoch 0 is read again
    assert p.stderr.count("skipped a bad sample") == 1  # rate-limited
    assert "2" in [line.split("\t")[0] for line in tsv.read_text().splitlines()], "no bad sample past step 1"
    p = forkserver.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr and "step 1 (epoch 0, batch 1)" in p.stdout + p.stderr
    assert tsv.read_text().startswith("step\tepoch\tbatch\tsample\treason\n")
    rows = bad_samples.read(str(tsv))
    assert sorted((r.epoch, os.path.basename(r.sample)) for r in rows) == sorted(  # each once per epoch
        (e, n) for e in (0, 1) for n in ("bad_corrupt.jpg", "bad_notimage.jpg", "bad_truncated.jpg"))
    assert all(r.step == 4 * r.epoch + r.batch + 1 and r.reason for r in rows)


def test_a_cache_folder_that_cannot_be_made_is_refused_in_one_line(tmp_path, monkeypatch):
    """MFF_DS_CACHE naming a file (or a folder without write permission): one line naming the setting, not a raw
    FileExistsError from the rank that builds the demo data."""
    from mff_ds.common import UserError
    from mff_ds.data import demo
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("MFF_DS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"MFF_DS_CACHE: expected a folder this process can write, got "
                                        rf"{tmp_path / 'cache'} \(File exists"):
        demo.demo_root()
