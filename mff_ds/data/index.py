"""The dataset index: an ImageFolder tree listed once (or an mmpretrain list file read once) into one file that every
rank and data worker maps read-only.

Why: on a shared filesystem (NFS, Lustre, GPFS, sshfs) listing ImageNet-1k's 1.28M files takes 10-20 s and every
process that lists pays again, against one metadata server. With the index, one process of a run lists (or nobody,
when the index is there), the others wait for it in one broadcast and map the file; workers share the mapping.

Where: `data.index` when set (a file of this format, or an mmpretrain list file: `relative/path.JPEG label` lines,
paths relative to the data root, e.g. ImageNet's meta/train.txt); else the first fresh one of
`<root>/.mff_ds.index` (beside the data) and `<cache>/index/<hash of the root>.index` (common.cache_dir()); a new
one goes beside the data when the root is writable and has class folders, else to the cache.

Fresh: the header records the class folders' names and mtimes (an added or removed file changes its folder's
mtime) or the list file's size and mtime; checking it reads the root directory once, never the class folders.
Files added in sub-folders of a class folder do not change the class folder's mtime: rerun `mff-ds index`.
A damaged index (bad magic, header, sizes or checksum) is never used: it is rebuilt, and the run says so.

The file (little-endian): MAGIC, u64 header length, the JSON header, then at 64-byte aligned offsets the arrays
`offsets` (u64, n + 1), `labels` (i32, n) and `names` (the root-relative paths, os.fsencode'd, concatenated):
about 12 bytes per file plus its path (ImageNet-1k: 42 bytes per file). No pickle: loading runs no code.
The samples keep the order the ImageFolder scan before the index gave, so runs keep their data stream.
"""
import hashlib
import json
import os
import sys
import time
import zlib

import numpy as np

from mff_ds.common import UserError, atomic_write, cache_dir, startup_phase

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAGIC = b"MFFIDX1\n"
VERSION = 1
INDEX_NAME = ".mff_ds.index"
ALIGN = 64
ARRAYS = (("offsets", "<u8"), ("labels", "<i4"), ("names", "u1"))
SAY_AFTER_S = 2.0  # a first listing shorter than this goes unsaid (no progress bar, no line)


class DamagedIndex(Exception):
    """The file is not a whole index of this format (rebuilt, or refused where it cannot be)."""


# ---------------------------------------------------------------------------------------------- reading
class Index:
    """A mapped index: len(), name(i) (root-relative path), labels (int32 array), classes (names or None)."""

    def __init__(self, path, header, buf):
        self.path, self.header, self._buf = path, header, buf
        self.root, self.classes = header["root"], header["classes"]
        arr = header["arrays"]
        self.offsets, self.labels, self.names = (buf[a:a + n * np.dtype(t).itemsize].view(t)
                                                 for (a, n), (_, t) in zip((arr[k] for k, _ in ARRAYS), ARRAYS))

    @classmethod
    def open(cls, path, digest=None):
        """Map and verify `path` (checksum, sizes, offsets); digest: refuse any other index (DamagedIndex)."""
        header, start = read_header(path)
        try:
            buf = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise DamagedIndex(f"cannot map it ({e})") from None
        try:
            index = cls._checked(path, header, start, buf)
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:  # a header of the wrong shape
            raise DamagedIndex(f"header: {type(e).__name__}") from None
        if digest is not None and digest_of(header) != digest:
            raise DamagedIndex("not the index the run agreed on")
        return index

    @classmethod
    def _checked(cls, path, header, start, buf):
        arr, n = header["arrays"], header["count"]
        expected = {"offsets": n + 1, "labels": n, "names": None}
        for (k, t) in ARRAYS:
            a, count = arr[k]
            if a < start or a + count * np.dtype(t).itemsize > len(buf) or expected[k] not in (None, count):
                raise DamagedIndex(f"array {k} outside the file")
        if zlib.crc32(buf[start:], _header_crc(header)) != header["crc32"]:
            raise DamagedIndex("checksum mismatch")
        index = cls(path, header, buf)
        o = index.offsets
        if o[0] != 0 or o[-1] != len(index.names) or (n and np.any(o[1:] < o[:-1])):
            raise DamagedIndex("path offsets out of order")
        return index

    def __reduce__(self):  # a spawned worker maps the file again rather than receiving a copy of it
        return Index.open, (self.path, digest_of(self.header))

    def __len__(self):
        return int(self.header["count"])

    def name(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return os.fsdecode(self.names[a:b].tobytes())


def read_header(path):
    """-> (header dict, where the arrays start); DamagedIndex when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise DamagedIndex("not an mff-ds index (magic)")
            size = int.from_bytes(head[len(MAGIC):], "little")
            if size > 1 << 30:
                raise DamagedIndex("header size")
            raw = f.read(size)
        header = json.loads(raw)
        if not isinstance(header, dict) or header.get("version") != VERSION:
            raise DamagedIndex(f"version {header.get('version') if isinstance(header, dict) else '?'}, "
                               f"expected {VERSION}")
        for k in ("root", "classes", "count", "arrays", "crc32", "fingerprint", "source"):
            if k not in header:
                raise DamagedIndex(f"header without {k!r}")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DamagedIndex(f"{type(e).__name__}: {str(e)[:100]}") from None
    return header, _aligned(len(MAGIC) + 8 + size)


def _header_crc(header):
    """The checksum covers the header's content (classes, positions, ...) as well as the arrays, but not the root
    (read only for messages; another node may mount the data elsewhere): the same listing gives the same digest."""
    return zlib.crc32(json.dumps({k: v for k, v in header.items() if k not in ("crc32", "root")},
                                 sort_keys=True).encode())


def digest_of(header):
    return f"{header['fingerprint']}-{header['count']}-{header['crc32']}"


def _aligned(n):
    return -(-n // ALIGN) * ALIGN


def is_index_file(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- what it lists
def tree_state(root):
    """(class names, [[folder, mtime_ns], ...]) from one read of the root directory: the class folders and their
    mtimes, or, for image files directly under the root (label -1), the root's own mtime ([["", mtime]])."""
    if not os.path.isdir(root):
        raise UserError(f"data.path: ImageFolder root {root!r} is not a directory")
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
        folders = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        images = any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries)
        if folders and images:
            raise UserError(f"data.path: {root!r} mixes image files and class directories; use one layout")
        if folders:
            return [e.name for e in folders], [[e.name, e.stat().st_mtime_ns] for e in folders]
        if images:
            return [], [["", os.stat(root).st_mtime_ns]]
    except OSError as e:
        raise UserError(f"data.path: cannot read ImageFolder root {root!r} ({e.strerror})") from None
    raise UserError(f"data.path: no image files ({', '.join(IMG_EXTENSIONS)}) under {root!r}")


def list_state(list_file):
    try:
        st = os.stat(list_file)
    except OSError as e:
        raise UserError(f"data.index: cannot read list file {list_file!r} ({e.strerror})") from None
    return [[os.path.abspath(list_file), st.st_size, st.st_mtime_ns]]


def fingerprint(state):
    return hashlib.sha256(json.dumps([VERSION, IMG_EXTENSIONS, state]).encode()).hexdigest()[:32]


def stale_reason(header, state):
    """Why an index with `header` does not list the tree (or list file) in `state` now, in a few words."""
    old = {f[0]: f[1:] for f in header.get("state", [])}
    new = {f[0]: f[1:] for f in state}
    added, removed = sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys())
    changed = sorted(k for k in new.keys() & old.keys() if new[k] != old[k])
    parts = [f"{len(v)} {what} (e.g. {v[0] or '<root>'})" for v, what in
             ((added, "added"), (removed, "removed"), (changed, "changed")) if v]
    return "; ".join(parts) or "listed with other settings"


def list_tree(root, classes, progress):
    """-> (root-relative paths as bytes, labels) in ImageFolder order (class folders by name, then sorted os.walk
    order; tests/test_index.py keeps the scan this replaced as the reference), one class folder at a time with a
    progress bar."""
    from tqdm import tqdm
    names, labels, cut = [], [], len(root.rstrip(os.sep)) + 1
    if not classes:
        with os.scandir(root) as it:
            files = sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        return [os.fsencode(f) for f in files], [-1] * len(files)
    bar = tqdm(classes, desc=f"listing {root}", unit="class", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5, delay=SAY_AFTER_S)
    for label, c in enumerate(bar):
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            dirnames.sort()
            here = dirpath[cut:] + os.sep
            found = [os.fsencode(here + f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
            names += found
            labels += [label] * len(found)
        bar.set_postfix(files=len(names), refresh=False)
    bar.close()
    if not names:
        raise UserError(f"data.path: no image files ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
    return names, labels


def read_list(list_file):
    """mmpretrain's ann_file: one `relative/path label` per line (the label after the last space; a line with one
    word is unlabelled, -1) -> (paths as bytes, labels)."""
    names, labels = [], []
    try:
        with open(list_file, "rb") as f:
            for no, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                path, _, label = line.rpartition(b" ")
                if not path:
                    path, label = label, b"-1"
                try:
                    labels.append(int(label))
                except ValueError:
                    raise UserError(f"data.index: {list_file}:{no}: expected `relative/path label`, got "
                                    f"{line[:120].decode(errors='replace')!r}") from None
                names.append(path.strip())
    except OSError as e:
        raise UserError(f"data.index: cannot read list file {list_file!r} ({e.strerror})") from None
    if not names:
        raise UserError(f"data.index: expected `relative/path label` lines, got an empty file {list_file!r}")
    return names, labels


# ---------------------------------------------------------------------------------------------- writing
def write(path, root, source, state, classes, names, labels):
    """Write the index atomically (a reader sees the old file or the new one); -> its header."""
    n = len(names)
    offsets = np.zeros(n + 1, dtype="<u8")
    np.cumsum([len(s) for s in names], out=offsets[1:])
    data = {"offsets": offsets, "labels": np.asarray(labels, dtype="<i4"),
            "names": np.frombuffer(b"".join(names), dtype=np.uint8)}
    header = {"version": VERSION, "root": root, "source": source, "state": state, "fingerprint": fingerprint(state),
              "classes": classes, "count": n, "arrays": {}, "crc32": 0}
    size = len(json.dumps(header)) + 200 + 60 * len(ARRAYS)  # room for the arrays' positions, filled below
    pos = _aligned(len(MAGIC) + 8 + size)
    start, blobs = pos, []
    for k, _ in ARRAYS:
        header["arrays"][k] = [pos, len(data[k])]
        blob = data[k].tobytes()
        blob += b"\0" * (_aligned(len(blob)) - len(blob))
        blobs.append(blob)
        pos += len(blob)
    crc = _header_crc(header)
    for blob in blobs:
        crc = zlib.crc32(blob, crc)
    header["crc32"] = crc
    raw = json.dumps(header).encode()
    assert len(raw) <= start - len(MAGIC) - 8, "the header outgrew the room kept for it"
    raw += b" " * (start - len(MAGIC) - 8 - len(raw))  # JSON ignores trailing spaces

    def put(tmp):
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(raw).to_bytes(8, "little") + raw)
            for blob in blobs:
                f.write(blob)
    atomic_write(path, put)
    return header


def locations(root, has_classes):
    """Where an index of `root` is looked for, in order, and where a new one goes."""
    cached = cache_dir() / "index" / (hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24] + ".index")
    beside = os.path.join(root, INDEX_NAME)
    if not has_classes:  # the root's mtime is the fingerprint: a file written into it would change it
        return [str(cached)], str(cached)
    return [beside, str(cached)], beside if os.access(root, os.W_OK) else str(cached)


def say(line):
    print(f"data index: {line}", file=sys.stderr, flush=True)


def ensure(root, index=None, *, progress=True, force=False, target=None):
    """The index of `root` (an ImageFolder) or of the list file `index`, fresh, built when missing, stale or damaged;
    -> (path, digest). `index` of this format: that file is the index. target: build there (one builder per node)."""
    root = os.path.abspath(root)
    if index is not None and not os.path.isfile(index) and not index.endswith(".index"):
        raise UserError(f"data.index: expected an existing list file or index, or a path ending in .index to build "
                        f"the index at, got {index!r}")
    is_list = index is not None and os.path.isfile(index) and not is_index_file(index)
    if is_list:
        state = list_state(index)
        key = hashlib.sha256(f"{os.path.abspath(index)}\0{root}".encode()).hexdigest()[:24]
        found, new = [str(cache_dir() / "index" / f"list-{key}.index")], None
        classes = None
    else:
        classes, state = tree_state(root)
        found, new = ([index], index) if index else locations(root, bool(classes))
    fp, why = fingerprint(state), ["listing again (forced)" if force else "no index yet"]
    for path in ([] if force else found):  # the first fresh one; else the first one found says why not
        if not os.path.exists(path):
            continue
        try:
            header, _ = read_header(path)
            if header["fingerprint"] == fp:  # the paths are relative: the same data mounted elsewhere is fresh too
                return path, digest_of(Index.open(path).header)
            why.append(f"{path} is stale ({stale_reason(header, state)})")
        except DamagedIndex as e:
            why.append(f"{path} is damaged ({e})")
    new = target or new or found[0]
    t, loud = time.perf_counter(), len(why) > 1 or force  # a first listing is said only when it takes a while
    why = why[min(len(why) - 1, 1)]
    if loud:
        say(f"{why}; {'reading' if is_list else 'listing'} {index if is_list else root} once")
    names, labels = read_list(index) if is_list else list_tree(root, classes, progress)
    try:
        header = write(new, root, "list" if is_list else "imagefolder", state, classes or None, names, labels)
    except OSError as e:
        raise UserError(f"data.index: cannot write the index {new!r} ({e.strerror}); set data.index to a writable "
                        f"path or MFF_DS_CACHE to a writable folder") from None
    size, took = os.path.getsize(new), time.perf_counter() - t
    if loud or took >= SAY_AFTER_S:
        say(f"{len(names):,} files of {index if is_list else root} -> {new} ({size / 2**20:.1f} MiB, "
            f"{size / max(len(names), 1):.0f} B per file) in {took:.1f} s")
    return new, digest_of(header)


def open_index(root, index=None):
    """The mapped Index of `root` (or list file `index`) for this process. Under torch.distributed (every rank
    calls it, in the same order): rank 0 checks or builds it and broadcasts where it is; the first rank of any node
    that does not see that file builds it there (node-local caches); every rank maps it."""
    with startup_phase("data_index"):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return Index.open(*ensure(root, index))
        got, error = [None], None
        if dist.get_rank() == 0:
            try:
                got = [("ok", *ensure(root, index))]
            except Exception as e:  # the other ranks wait in the broadcast: they hear of it and end too
                error = e
                got = [("error", str(e) if isinstance(e, UserError) else
                        f"rank 0 could not index {root!r} ({type(e).__name__}: {e})")]
        dist.broadcast_object_list(got, src=0)
        if error is not None:
            raise error
        if got[0][0] == "error":
            raise UserError(got[0][1])
        _, path, digest = got[0]
        if dist.get_rank() != 0 and int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0 and not _is(path, digest):
            ensure(root, index, target=path, force=True)
        dist.barrier()
        try:
            return Index.open(path, digest)
        except DamagedIndex as e:
            raise UserError(f"data index {path}: {e}; the data under {root!r} differs between nodes, or the index "
                            f"changed during the start") from None


def _is(path, digest):
    try:
        return digest_of(read_header(path)[0]) == digest
    except DamagedIndex:
        return False


# ------------------------------------------------------------------------------------------ the command
def main(argv=None):
    """mff-ds index DATA_DIR [--out FILE] [--list FILE] [--force]: list an ImageFolder once (or read a list file)
    into the index every run of it then maps; says where it is and what it holds."""
    import argparse
    ap = argparse.ArgumentParser(prog="mff-ds index", description=main.__doc__.split(":", 1)[1].strip(),
                                 allow_abbrev=False)
    ap.add_argument("data_dir", help="the ImageFolder root (the recipe's data.path)")
    ap.add_argument("--out", default=None, help=f"the index file (default: DATA_DIR/{INDEX_NAME}, or the cache "
                    "folder when DATA_DIR is read-only); then set data.index to it")
    ap.add_argument("--list", default=None, help="an mmpretrain list file (`relative/path label` lines, e.g. "
                    "meta/train.txt) to read instead of listing DATA_DIR")
    ap.add_argument("--force", action="store_true", help="list again even when the index is fresh")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.list and a.out:
        return _fail("--out and --list: a list file's index goes to the cache; give one of them")
    try:
        path, _ = ensure(a.data_dir, a.list or a.out, progress=not a.no_progress, force=a.force)
        index = Index.open(path)
    except (UserError, DamagedIndex) as e:
        return _fail(str(e))
    size, n = os.path.getsize(path), len(index)
    classes = f"{len(index.classes)} classes" if index.classes else "no class names"
    print(f"{path}: {n:,} files, {classes}, {size / 2**20:.1f} MiB ({size / max(n, 1):.0f} B per file); "
          f"runs of {os.path.abspath(a.data_dir)} use it" + (f" with data.index={a.out}" if a.out else "")
          + (f" with data.index={a.list}" if a.list else ""))
    return 0


def _fail(line):
    print(f"mff-ds index: {line}", file=sys.stderr)
    return 2
