"""ImageFolder -> WebDataset tar shards + _info.json.

    python -m mff_ds.data.make_shards SRC_IMAGEFOLDER OUT_DIR --shard-size N [--split train] [--workers 4]

Files are shuffled with --seed (so each shard mixes classes) and cut into shards `{split}-{i:06d}.tar` holding
`{key}.{jpg|png|...}` (the original bytes), `{key}.cls` (class index, absent when unlabelled) and
`{key}.fname` (path relative to SRC). Every image is decoded first; files that do not decode are left out and
listed in _info.json. Each shard is written to a temporary name and renamed when complete; a per-shard record
in OUT_DIR/.make_shards/ lets an interrupted conversion resume where it stopped. _info.json holds, per split,
the shards with their sample counts, the total, the class names and the skipped files.
"""
import argparse
import hashlib
import json
import math
import os
import sys
from multiprocessing import Pool

import numpy as np
import webdataset as wds
from tqdm import tqdm

from mff_ds.common import UserError, write_json

from .index import open_index
from .sources import INFO_NAME
from .transforms import decode_rgb


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _write_shard(job):
    """Write one shard (tmp name, then rename); -> its record {name, count, skipped}."""
    out, name, src, files = job
    final, tmp = os.path.join(out, name), os.path.join(out, f".{name}.tmp{os.getpid()}")
    count, skipped = 0, []
    try:
        sink = wds.TarWriter(tmp)
        for index, path, label in files:
            rel = os.path.relpath(path, src)
            try:
                with open(path, "rb") as f:
                    data = f.read()
                decode_rgb(data, fast=False)
            except Exception as e:
                skipped.append(f"{rel}: {str(e)[:200]}")
                continue
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            sample = {"__key__": f"{index:09d}", {"jpeg": "jpg"}.get(ext, ext): data, "fname": rel}
            if label >= 0:
                sample["cls"] = str(label)
            sink.write(sample)
            count += 1
        sink.close()
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    record = {"name": name, "count": count, "skipped": skipped}
    write_json(os.path.join(out, ".make_shards", name + ".json"), record, indent=1)
    os.replace(tmp, final)
    return record


def convert(src, out, shard_size, split="train", seed=0, shuffle=True, workers=1, progress=True, index=None,
            allow_missing=False):
    """Convert ImageFolder `src` into shards of `split` under `out`; resumes an interrupted run. -> info dict.
    index: the dataset index or mmpretrain list file of `src` (None: found or built, data/index.py); allow_missing:
    leave out (named) the files the list names that are not there."""
    if shard_size < 1:
        raise UserError(f"--shard-size: expected an integer >= 1, got {shard_size}")
    src = os.path.abspath(src)
    idx = open_index(src, index, allow_missing)
    samples = [(os.path.join(src, idx.name(i)), int(idx.labels[i])) for i in range(len(idx))]
    classes = idx.classes or []
    order = np.random.default_rng(seed).permutation(len(samples)) if shuffle else np.arange(len(samples))
    n_shards = math.ceil(len(samples) / shard_size)
    names = [f"{split}-{i:06d}.tar" for i in range(n_shards)]
    os.makedirs(os.path.join(out, ".make_shards"), exist_ok=True)
    for f in os.listdir(out):  # temporary files of a killed run
        if f.startswith(f".{split}-") and ".tar.tmp" in f:
            os.remove(os.path.join(out, f))

    params = {"src": os.path.abspath(src), "split": split, "shard_size": shard_size, "seed": seed,
              "shuffle": shuffle, "files": len(samples),
              "files_sha1": hashlib.sha1("\n".join(p for p, _ in samples).encode()).hexdigest()}
    params_path = os.path.join(out, ".make_shards", f"{split}.params.json")
    old = read_json(params_path)
    if old is not None and old != params:
        raise UserError(f"{out} holds a conversion of split {split!r} with other parameters {old}, "
                        f"now {params}; delete {os.path.join(out, '.make_shards')} and the shards to restart")
    write_json(params_path, params, indent=1)

    def record_path(name):
        return os.path.join(out, ".make_shards", name + ".json")

    todo = [i for i, name in enumerate(names)
            if not (os.path.exists(os.path.join(out, name)) and os.path.exists(record_path(name)))]
    jobs = [(out, names[i], os.path.abspath(src),
             [(int(k), *samples[k]) for k in order[i * shard_size:(i + 1) * shard_size]]) for i in todo]
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), unit="shard", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_shard, jobs):
                bar.update()
    else:
        for job in jobs:
            _write_shard(job)
            bar.update()
    bar.close()

    records = [read_json(record_path(n)) for n in names]
    info = read_json(os.path.join(out, INFO_NAME), {"format": "mff_ds-shards-v1", "splits": {}})
    info["splits"][split] = {
        "pattern": f"{split}-{{000000..{n_shards - 1:06d}}}.tar",
        "shards": [{"name": r["name"], "count": r["count"]} for r in records],
        "num_samples": sum(r["count"] for r in records),
        "classes": classes,
        "skipped": [s for r in records for s in r["skipped"]],
        "source": params["src"], "shard_size": shard_size, "seed": seed,
    }
    write_json(os.path.join(out, INFO_NAME), info, indent=1)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mff_ds.data.make_shards", description=__doc__.split("\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("src", help="ImageFolder root (class sub-directories, or images directly for unlabelled)")
    ap.add_argument("out", help="output directory for the shards and _info.json")
    ap.add_argument("--shard-size", type=int, required=True, help="images per shard (e.g. 1000-5000)")
    ap.add_argument("--split", default="train", help="split name, also the shard name prefix")
    ap.add_argument("--seed", type=int, default=0, help="seed of the file shuffle")
    ap.add_argument("--no-shuffle", action="store_true", help="keep the sorted ImageFolder order")
    ap.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    ap.add_argument("--index", default=None, help="the dataset index (mff-ds index) or an mmpretrain list file of "
                    "SRC (default: found beside SRC or in the cache, else built)")
    ap.add_argument("--allow-missing", action="store_true", help="--index a list file: leave out the listed files "
                    "that are not there (named) instead of refusing")
    a = ap.parse_args(argv)
    try:
        info = convert(a.src, a.out, a.shard_size, a.split, a.seed, not a.no_shuffle, a.workers, index=a.index,
                       allow_missing=a.allow_missing)
    except UserError as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 2
    s = info["splits"][a.split]
    print(f"{a.out}: {len(s['shards'])} shards, {s['num_samples']} samples, {len(s['skipped'])} skipped; "
          f"use data.path={os.path.join(a.out, s['pattern'])}")
    for line in s["skipped"][:10]:
        print("  skipped", line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
