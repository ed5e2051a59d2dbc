"""Reading ImageFolder files (listed by index.py) and WebDataset tar shards, and how an epoch is split (the helpers
behind the registered sources of registry.py).

ImageFolder: one seeded permutation of all files per epoch; rank r takes every world-th index, so every rank
gets the same count (truncated, or wrapped when drop_last=False, as DistributedSampler does). Batch b of a rank
is fixed by (seed, epoch, rank, b) whatever the number of workers.

Shards: the shard list is shuffled with (seed, epoch), split by rank then by worker; each worker reads its
shards through a seeded shuffle buffer, wrapping around its shards (reshuffled) when it needs more samples and
stopping when it has its quota, so every rank yields the same number of samples. The stream of a rank is fixed
by (seed, epoch, rank, num_workers). Sample counts come from `_info.json` (written by make_shards) next to the
shards, or from `num_samples`.

Shard urls are what webdataset opens: local paths, `pipe:CMD` (CMD's stdout is the tar, e.g.
`pipe:aws s3 cp s3://bucket/train-{000000..001023}.tar -`) or urls; brace ranges and '::' lists are expanded.
For a `pipe:` pattern the `_info.json` is fetched through the same command with the shard's file name replaced.
"""
import json
import os
import random
import subprocess
import tarfile
import tempfile

import numpy as np
import webdataset as wds

from mff_ds.common import UserError

IMG_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "pgm", "gif", "img")
INFO_NAME = "_info.json"


# ------------------------------------------------------------------------------------------ ImageFolder
def rank_indices(n, rank, world, seed, epoch, drop_last):
    """This rank's sample indices for the epoch (same length on every rank)."""
    perm = np.random.default_rng([seed, epoch, 7919]).permutation(n)
    per_rank = n // world if drop_last else -(-n // world)
    if per_rank * world > n:
        perm = np.resize(perm, per_rank * world)  # wraps around
    return perm[rank:per_rank * world:world]


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------- shards
def expand_shards(path):
    """Brace pattern, '::'-separated list or single path -> list of shard urls (webdataset's expansion).
    Local shards must exist; for `pipe:` and remote urls see `check_readable`."""
    urls = [u for u in wds.shardlists.expand_urls(str(path)) if u]
    if not urls:
        raise UserError(f"data.path: no shards in {path!r}")
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise UserError(f"data.path: expected existing shard files, got {len(missing)} of {len(urls)} missing for "
                        f"{path!r}, e.g. {missing[0]!r}")
    return urls


def is_remote(url):
    return url.startswith("pipe:") or "://" in url


def _shard_token(url):
    """The part of a shard url that names the shard: the url itself, or for `pipe:CMD` the first word of CMD
    containing '.tar' (e.g. `s3://bucket/train-000001.tar` in `pipe:aws s3 cp s3://bucket/train-000001.tar -`)."""
    if not url.startswith("pipe:"):
        return url
    return next((w for w in url[5:].split() if ".tar" in w), None)


def info_url(url):
    """The url of the `_info.json` beside shard `url`, through the same command for `pipe:` urls; None when
    the shard cannot be located in the command."""
    token = _shard_token(url)
    if token is None:
        return None
    return url.replace(token, token[:token.rfind("/") + 1] + INFO_NAME, 1)


def _run_pipe(url, limit=None, timeout=300):
    """Output of the command of a `pipe:` url (at most `limit` bytes) -> (bytes, error or None). Our own
    subprocess rather than webdataset's Pipe: its stderr is captured for the one-line error, not printed."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block on it
        p = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=stderr)
        try:
            data = p.stdout.read(limit) if limit else p.stdout.read()
            p.stdout.close()  # a command still writing gets SIGPIPE (or EPIPE) and ends
            status = p.wait(timeout)
        except BaseException:
            p.kill()
            p.wait()
            raise
        stderr.seek(0)
        err = stderr.read().decode(errors="replace").strip()
    if status and not (limit and len(data) >= limit):  # after a full `limit`, we cut it short: any status
        return data, f"exit status {status}" + (f": {err.splitlines()[-1][:300]}" if err else "")
    return data, None


def fetch(url, limit=None):
    """Bytes of a local path, `pipe:` command or url webdataset can open -> (bytes, error or None)."""
    if url.startswith("pipe:"):
        return _run_pipe(url, limit)
    try:
        with wds.gopen(url, "rb") as f:
            return (f.read(limit) if limit else f.read()), None
    except Exception as e:
        return b"", f"{type(e).__name__}: {str(e)[:300]}"


def check_readable(url):
    """Raise one clear error when the first bytes of shard `url` are not a tar header (missing file, failing
    command). Local shards are checked by expand_shards."""
    head, err = fetch(url, limit=512)
    if not err:
        try:
            tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")  # checks the header's checksum
        except tarfile.HeaderError as e:
            err = f"not a tar file: {e}; first bytes {head[:40]!r}"
    if err:
        raise UserError(f"data.path: cannot read shard {url!r} ({err})")


def shard_counts(urls):
    """Sample count per shard from the `_info.json` beside the shards (a local file, or fetched through the
    same `pipe:` command or url as the shards) -> (counts or None, where it was looked for and why not)."""
    where = info_url(urls[0])
    if where is None:
        return None, f"no shard file name ending in .tar in {urls[0]!r}"
    if is_remote(urls[0]):
        data, err = fetch(where)
        if err or not data:
            return None, f"{where}: {err or 'empty'}"
    elif os.path.exists(where):
        try:
            data = read_file(where)
        except OSError as e:
            raise UserError(f"data.path: cannot read {where} ({e.strerror})") from None
    else:
        return None, f"{where}: does not exist"
    try:
        info = json.loads(data)
        counts = {s["name"]: s["count"] for split in info["splits"].values() for s in split["shards"]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"data.path: {where} is not an {INFO_NAME} written by make_shards "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
    try:
        return [counts[os.path.basename(_shard_token(u) or u)] for u in urls], None
    except KeyError as e:
        raise UserError(f"data.path: shard {e.args[0]} is not listed in {where}") from None


def iter_shard(url):
    """Samples of one tar shard as (name, data, label); data is the image bytes, None when the sample has no
    image entry, or a str error message when the tar itself is broken (which ends the shard)."""
    errors = []

    def handler(exn):
        errors.append(f"{type(exn).__name__}: {exn}")
        return False

    for s in wds.tariterators.tarfile_samples([{"url": url}], handler=handler):
        key = next((k for k in IMG_KEYS if k in s), None)
        label = s.get("cls", b"-1")
        try:
            label = int(label.decode() if isinstance(label, bytes) else label)
        except ValueError:
            label = -1
        fname = s.get("fname")
        name = f"{url}:{s['__key__']}" + (f" ({fname.decode(errors='replace')})" if fname else "")
        yield name, (s[key] if key else None), label
    if errors:
        yield url, "broken shard: " + errors[0][:300], -1


def worker_passes(urls, rank, world, worker, num_workers, seed, epoch, resample):
    """Endless iterator of passes (lists of shard urls) this (rank, worker) reads this epoch; with resampling
    one endless pass of shards drawn with replacement."""
    if resample:
        rng = random.Random(f"{seed}-{epoch}-{rank}-{worker}")
        yield (rng.choice(urls) for _ in iter(int, 1))
        return
    readers = world * num_workers
    if len(urls) < readers:
        raise UserError(
            f"data.path: {len(urls)} shards for {world} ranks x {num_workers} workers = {readers} readers; "
            f"need at least {readers} shards, or set data.resample_shards=true, or lower data.num_workers")
    order = list(urls)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    mine = order[rank::world][worker::num_workers]
    for rnd in range(1 << 30):
        if rnd:
            random.Random(f"{seed}-{epoch}-{rank}-{worker}-{rnd}").shuffle(mine)
        yield list(mine)


def sample_stream(urls, rank, world, worker, num_workers, seed, epoch, resample, shuffle_buffer):
    """Endless stream of (name, data, label) for one (rank, worker), through a seeded shuffle buffer that is
    emptied at the end of each pass, so a pass yields each sample of the worker's shards exactly once."""
    rng = random.Random(f"{seed}-{epoch}-{rank}-{worker}-buffer")
    for shard_list in worker_passes(urls, rank, world, worker, num_workers, seed, epoch, resample):
        buf, n, empty = [], 0, 0
        for url in shard_list:
            empty += 1
            if empty > 10 * len(urls) + 10:
                raise UserError(f"data.path: no samples in the shards, e.g. {url}")
            for sample in iter_shard(url):
                n, empty = n + 1, 0
                buf.append(sample)
                if len(buf) >= max(shuffle_buffer, 1):
                    k = rng.randrange(len(buf))
                    buf[k], buf[-1] = buf[-1], buf[k]
                    yield buf.pop()
        rng.shuffle(buf)
        yield from buf
        if n == 0:
            raise UserError(f"data.path: no samples in the shards {shard_list[:3]}...")
