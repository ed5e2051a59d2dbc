"""The dataset index: an ImageFolder tree listed once (or an mmpretrain list file read once) into one file that every
rank and data worker maps read-only.

Why: on a shared filesystem (NFS, Lustre, GPFS, sshfs) listing ImageNet-1k's 1.28M files takes 10-20 s and every
process that lists pays again, against one metadata server. With the index, one process of a run lists (or nobody,
when the index is there), the others wait for it in one broadcast and map the file; workers share the mapping.

Where: `data.index` when set (a file of this format, or an mmpretrain list file: `relative/path.JPEG label` lines,
paths relative to the data root, e.g. ImageNet's meta/train.txt); else the first fresh one of
`<root>/.mff_ds.index` (beside the data) and `<cache>/index/<hash of the root>.<host>.index` (common.cache_dir(); one
per host, so that nodes with their own copies of the data never overwrite each other's). A new one goes beside the
data when the root is writable, else to this host's file in the cache.

Fresh (docs/DATA.md "What a fresh index guarantees"): the header records every folder it listed with its mtime and
ctime. Adding, removing or renaming a file changes its folder's ctime, and no tool can set a ctime back (`tar` and
`rsync -t` restore mtimes, which is why mtimes alone missed a second archive extracted into the same folders).
Checking costs one read of the root directory and one stat per listed folder, never a listing. The folder that holds
the index file itself (a flat root, e.g. ImageNet val, or `--out` inside the data) is compared by the names it holds
instead, read in that one directory read, since writing the index changes its times. A list file's index records the
list file and the folders it names the same way. A damaged index (bad magic, header, sizes or checksum) is never
used: it is rebuilt, and the run says so.

Agreement: the header's `content` digest covers what the index holds (class names, paths, labels) and nothing of when
or where it was made, so nodes with their own copies of the same data (other times, other mount paths) agree, and
copies that differ are refused naming the first difference (open_index).

The file (little-endian): MAGIC, u64 header length, the JSON header, then at 64-byte aligned offsets the arrays
`offsets` (u64, n + 1), `labels` (i32, n) and `names` (the root-relative paths, os.fsencode'd, concatenated):
about 12 bytes per file plus its path (ImageNet-1k: 42 bytes per file). No pickle: loading runs no code.
The samples keep the order the ImageFolder scan before the index gave, so runs keep their data stream.
"""
import hashlib
import json
import os
import re
import socket
import sys
import time
import zlib

import numpy as np

from mff_ds.common import UserError, atomic_write, cache_dir, startup_phase

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAGIC = b"MFFIDX1\n"
VERSION = 2  # 2: content digest, folders' ctimes, list files checked; a version-1 index is listed again once
INDEX_NAME = ".mff_ds.index"
ALIGN = 64
ARRAYS = (("offsets", "<u8"), ("labels", "<i4"), ("names", "u1"))
SAY_AFTER_S = 2.0  # a first listing shorter than this goes unsaid (no progress bar, no line)
LABEL_MAX = 2**31 - 1  # labels are int32
NAMED = 3  # missing files named in a message
CHUNK = 4096  # entries per hash when nodes compare listings that differ


class DamagedIndex(Exception):
    """The file is not a whole index of this format (rebuilt, or refused where it cannot be)."""


# ---------------------------------------------------------------------------------------------- reading
class Index:
    """A mapped index: len(), name(i) (root-relative path), labels (int32 array), classes (names or None),
    missing ({"count", "examples"}: listed files left out under data.allow_missing, or None)."""

    def __init__(self, path, header, buf):
        self.path, self.header, self._buf = path, header, buf
        self.root, self.classes, self.missing = header["root"], header["classes"], header.get("missing")
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
        version = header.get("version") if isinstance(header, dict) else "?"
        if version != VERSION:
            raise DamagedIndex(f"index format {version}, this mff-ds reads {VERSION}")
        for k in ("root", "classes", "count", "arrays", "crc32", "content", "state", "source", "settings"):
            if k not in header:
                raise DamagedIndex(f"header without {k!r}")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DamagedIndex(f"{type(e).__name__}: {str(e)[:100]}") from None
    return header, _aligned(len(MAGIC) + 8 + size)


def _header_crc(header):
    """The checksum covers the header's content (classes, positions, ...) as well as the arrays, but not the root
    (read only for messages; another node may mount the data elsewhere)."""
    return zlib.crc32(json.dumps({k: v for k, v in header.items() if k not in ("crc32", "root")},
                                 sort_keys=True).encode())


def digest_of(header):
    """What the index holds (classes, paths, labels), not when or where it was listed: what ranks agree on."""
    return header["content"]


def content_digest(classes, offsets, labels, names):
    h = hashlib.sha256(json.dumps(classes).encode())
    for a in (offsets, labels, names):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _aligned(n):
    return -(-n // ALIGN) * ALIGN


def is_index_file(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- what it lists
def _images(names):
    return sorted(n for n in names if n.lower().endswith(IMG_EXTENSIONS))


def _names_state(rel, names):
    """A folder recorded by the image names it holds (the folder the index is written into)."""
    return [rel, "names", hashlib.sha256("\0".join(_images(names)).encode(errors="surrogateescape")).hexdigest()[:32]]


def _time_state(rel, st):
    return [rel, st.st_mtime_ns, st.st_ctime_ns]


def _read_dir(path, what="data.path"):
    """(os.stat before the read, entries) of one folder; one line naming it when it cannot be read."""
    try:
        st = os.stat(path)
        with os.scandir(path) as it:
            return st, list(it)
    except OSError as e:
        raise UserError(f"{what}: cannot read folder {path!r} ({e.strerror})") from None


def root_layout(root):
    """(class folder names, image file names directly under the root) from one read of the root directory."""
    if not os.path.isdir(root):
        raise UserError(f"data.path: ImageFolder root {root!r} is not a directory")
    _, entries = _read_dir(root, "data.path: ImageFolder root")
    folders = sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))
    images = _images(e.name for e in entries if not _is_dir(e))
    if folders and images:
        raise UserError(f"data.path: {root!r} mixes image files and class directories; use one layout")
    if not folders and not images:
        raise UserError(f"data.path: no image files ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
    return folders, images


def _is_dir(entry):
    try:
        return entry.is_dir()  # follows symlinks, as os.walk does
    except OSError:
        return False


def _walk(top, cut, state, holder):
    """[(folder, file names)] of every folder under `top` in `sorted(os.walk(top, followlinks=True))` order (the
    scan the index replaced), each folder's state recorded in `state` before it is read (a file added while it is
    listed makes the index stale, never silently missing). A symlink back to an ancestor is not followed again
    (os.walk would loop until the path is too long)."""
    out, stack = [], [(top, frozenset())]
    while stack:
        folder, ancestors = stack.pop()
        st, entries = _read_dir(folder)
        if (st.st_dev, st.st_ino) in ancestors:
            continue
        below = ancestors | {(st.st_dev, st.st_ino)}
        rel = folder[cut:]
        files = [e.name for e in entries if not _is_dir(e)]
        state.append(_names_state(rel, files) if folder == holder else _time_state(rel, st))
        stack += [(os.path.join(folder, e.name), below) for e in entries if _is_dir(e)]
        out.append((folder, files))
    return sorted(out)


def list_tree(root, holder=None, progress=True, layout=None):
    """-> (class names or None, root-relative paths as bytes, labels, state) in ImageFolder order (class folders by
    name, then sorted os.walk order; tests/test_index.py keeps the scan this replaced as the reference), one class
    folder at a time with a progress bar. holder: the folder the index goes into (recorded by names, not times);
    layout: root_layout(root), when already read."""
    from tqdm import tqdm
    classes, flat = layout or root_layout(root)
    if not classes:  # the root's images are read in the same directory read that checks it: recorded by names
        return None, [os.fsencode(f) for f in flat], [-1] * len(flat), [_names_state("", flat)]
    names, labels, state, cut = [], [], [], len(root.rstrip(os.sep)) + 1
    bar = tqdm(classes, desc=f"listing {root}", unit="class", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5, delay=SAY_AFTER_S)
    for label, c in enumerate(bar):
        for folder, files in _walk(os.path.join(root, c), cut, state, holder):
            here = folder[cut:] + os.sep
            found = [os.fsencode(here + f) for f in _images(files)]
            names += found
            labels += [label] * len(found)
        bar.set_postfix(files=len(names), refresh=False)
    bar.close()
    if not names:
        raise UserError(f"data.path: no image files ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
    return classes, names, labels, sorted(state)


_LINE = re.compile(rb"^(.*?)\s+(\S+)$")


def read_list(list_file):
    """mmpretrain's ann_file: one `relative/path label` per line, spaces or tabs between them (the label is the last
    word; a line of one word is unlabelled, -1) -> (paths as bytes, labels). Labels are int32, -1 or above."""
    names, labels = [], []
    try:
        with open(list_file, "rb") as f:
            for no, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                m = _LINE.match(line)
                path, label = (m.group(1), m.group(2)) if m else (line, b"-1")
                try:
                    value = int(label)
                except ValueError:
                    raise UserError(f"data.index: {list_file}:{no}: expected `relative/path label` (an integer "
                                    f"label after spaces or a tab), got {line[:120].decode(errors='replace')!r}"
                                    ) from None
                if not -1 <= value <= LABEL_MAX:
                    raise UserError(f"data.index: {list_file}:{no}: expected a label in [0, {LABEL_MAX}] (or -1: "
                                    f"unlabelled), got {label[:30].decode(errors='replace')}")
                names.append(path)
                labels.append(value)
    except OSError as e:
        raise UserError(f"data.index: cannot read list file {list_file!r} ({e.strerror})") from None
    if not names:
        raise UserError(f"data.index: expected `relative/path label` lines, got an empty file {list_file!r}")
    return names, labels


def _list_state(list_file):
    try:
        st = os.stat(list_file)
    except OSError as e:
        raise UserError(f"data.index: cannot read list file {list_file!r} ({e.strerror})") from None
    return ["list:" + os.path.abspath(list_file), st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def check_listed(root, list_file, names, labels, holder, allow_missing):
    """Every listed file present: reads each folder the list names once (a listing's cost, only when the index is
    built). -> (names, labels, state of those folders, missing) with the missing files left out when allow_missing;
    else one line naming how many are missing and the first ones."""
    folders = {}
    for i, n in enumerate(names):
        folders.setdefault(os.path.dirname(n), []).append(i)
    state, missing = [], []
    for folder in sorted(folders):
        path = os.path.join(os.fsencode(root), folder) if folder else os.fsencode(root)
        try:
            st = os.stat(path)
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            st, entries = None, []
        present, rel = {e.name for e in entries}, os.fsdecode(folder)
        state.append([rel, "absent"] if st is None else _time_state(rel, st) if path != os.fsencode(holder) else
                     _names_state(rel, [os.fsdecode(e.name) for e in entries if not _is_dir(e)]))
        missing += [i for i in folders[folder] if os.path.basename(names[i]) not in present]
    if missing and not allow_missing:
        shown = ", ".join(repr(os.fsdecode(names[i])) for i in sorted(missing)[:NAMED])
        raise UserError(f"data.index: {len(missing):,} of the {len(names):,} files {list_file} lists are not under "
                        f"{root!r} (e.g. {shown}); expected every listed file, or data.allow_missing: true (mff-ds "
                        f"index --allow-missing) to leave them out")
    gone = set(missing)
    kept = [i for i in range(len(names)) if i not in gone] if gone else range(len(names))
    record = {"count": len(missing), "examples": [os.fsdecode(names[i]) for i in sorted(missing)[:NAMED]]}
    return [names[i] for i in kept], [labels[i] for i in kept], state, record if missing else None


def current_state(header, root, root_images=None):
    """The state the header's source has now (same shape as header["state"]): one stat per recorded folder, one read
    for a folder recorded by names (root_images: the root's image names, already read)."""
    out = []
    for entry in header["state"]:
        key = entry[0]
        if key == "" and root_images is not None and entry[1] == "names":
            out.append(_names_state("", root_images))
            continue
        if key.startswith("list:"):
            try:
                out.append(_list_state(key[len("list:"):]))
            except UserError:
                out.append([key, "absent"])
            continue
        path = os.path.join(root, key) if key else root
        try:
            if len(entry) > 1 and entry[1] == "names":
                with os.scandir(path) as it:
                    out.append(_names_state(key, [e.name for e in it if not _is_dir(e)]))
            else:
                out.append(_time_state(key, os.stat(path)))
        except OSError:
            out.append([key, "absent"])
    return out


def stale_reason(header, root, settings, layout=None):
    """None when the index with `header` lists the data under `root` as it is now, else why not, in a few words.
    layout: root_layout(root), when already read."""
    if header["settings"] != settings:
        return "listed with other settings"
    added = removed = images = []
    if header["source"] != "list":
        classes, images = layout or root_layout(root)
        then = header["classes"] or []
        added, removed = sorted(set(classes) - set(then)), sorted(set(then) - set(classes))
    old = {e[0]: e[1:] for e in header["state"]}
    changed = sorted(e[0] for e in current_state(header, root, images) if e[1:] != old[e[0]]
                     and e[0].split(os.sep)[0] not in removed)
    parts = [f"{len(v)} {what} (e.g. {v[0][len('list:'):] if v[0].startswith('list:') else v[0] or '<root>'})"
             for v, what in ((added, "added"), (removed, "removed"), (changed, "changed")) if v]
    return "; ".join(parts) or None


# ---------------------------------------------------------------------------------------------- writing
def write(path, root, source, state, settings, classes, names, labels, missing=None):
    """Write the index atomically (a reader sees the old file or the new one); -> its header."""
    n = len(names)
    offsets = np.zeros(n + 1, dtype="<u8")
    np.cumsum([len(s) for s in names], out=offsets[1:])
    data = {"offsets": offsets, "labels": np.asarray(labels, dtype="<i4"),
            "names": np.frombuffer(b"".join(names), dtype=np.uint8)}
    header = {"version": VERSION, "root": root, "source": source, "state": state, "settings": settings,
              "classes": classes, "count": n, "missing": missing,
              "content": content_digest(classes, data["offsets"], data["labels"], data["names"]),
              "arrays": {}, "crc32": 0}
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


def host():
    """This node's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _cached(key):
    """This host's index file of `key` in the cache."""
    return str(cache_dir() / "index" / f"{key}.{host()}.index")


def _other_hosts(key):
    """The other hosts' index files of `key` in the cache, newest first (read only when no other index is fresh)."""
    folder, own = cache_dir() / "index", _cached(key)
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        found = [(e.stat().st_mtime_ns, e.path) for e in it
                 if e.name.startswith(key + ".") and e.name.endswith(".index") and e.path != own and e.is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def say(line):
    print(f"data index: {line}", file=sys.stderr, flush=True)


def _plan(root, index, out=None):
    """(list file or None, the primary index path or None, the cache key) for `root` and data.index `index` (out:
    where the index of list file `index` goes instead of the cache)."""
    list_file, primary = None, None
    if index is not None and os.path.isfile(index) and is_index_file(index):
        primary = index
        try:  # an index made from a list file stays one: it is checked, and rebuilt, from that list
            header, _ = read_header(index)
            list_file = header["settings"].get("list") if header["source"] == "list" else None
        except DamagedIndex:
            pass
    elif index is not None and os.path.isfile(index):
        list_file, primary = index, out
    elif index is not None:
        if not index.endswith(".index"):
            raise UserError(f"data.index: expected an existing list file or index, or a path ending in .index to "
                            f"build the index at, got {index!r}")
        primary = index
    elif os.path.isdir(root):
        primary = os.path.join(root, INDEX_NAME)
    what = os.path.realpath(root) + (f"\0{os.path.abspath(list_file)}" if list_file else "")
    key = ("list-" if list_file else "") + hashlib.sha256(what.encode(errors="surrogateescape")).hexdigest()[:24]
    return list_file, primary, key


def ensure(root, index=None, *, progress=True, force=False, allow_missing=False, node=False, out=None):
    """The index of `root` (an ImageFolder) or of the list file `index`, fresh, built when missing, stale or damaged;
    -> (path, digest). `index` of this format: that file is the index (made from a list file: from that list).
    out: where a list file's index goes (default: this host's file in the cache). node: for a node that found rank
    0's index stale or unseen: build into this host's cache file, never over the index other nodes use."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise UserError(f"data.path: ImageFolder root {root!r} is not a directory")
    list_file, primary, key = _plan(root, index, out)
    settings = {"list": os.path.abspath(list_file), "allow_missing": bool(allow_missing)} if list_file else {}
    own = _cached(key)
    layout = None if list_file else root_layout(root)  # one read of the root for every check and the listing
    why = ["listing again (forced)" if force else "no index yet"]
    for path in [] if force else [primary, own]:  # the first fresh one; else the first found says why
        if path is None or not os.path.exists(path):
            continue
        try:
            header, _ = read_header(path)
            reason = stale_reason(header, root, settings, layout)
            if reason is None:  # the paths are relative: the same data mounted elsewhere is fresh too
                return path, digest_of(Index.open(path).header)
            why.append(f"{path} is stale ({reason})")
        except DamagedIndex as e:
            why.append(f"{path} is damaged ({e})")
    for path in [] if force else _other_hosts(key):  # another host's, fresh here too (data on a shared filesystem)
        try:
            header, _ = read_header(path)
            if stale_reason(header, root, settings, layout) is None:
                return path, digest_of(Index.open(path).header)
        except (DamagedIndex, OSError):
            continue
    writable = primary is not None and (primary in (index, out) or os.access(os.path.dirname(primary), os.W_OK))
    new = own if node or not writable else primary
    t, loud = time.perf_counter(), len(why) > 1 or force  # a first listing is said only when it takes a while
    if loud:
        say(f"{why[min(len(why) - 1, 1)]}; {'reading' if list_file else 'listing'} {list_file or root} once")
    holder = os.path.dirname(os.path.abspath(new))
    missing = None
    if list_file:
        names, labels = read_list(list_file)
        names, labels, state, missing = check_listed(root, list_file, names, labels, holder, allow_missing)
        state, classes = [_list_state(list_file)] + state, None
    else:
        classes, names, labels, state = list_tree(root, holder, progress, layout)
    try:
        header = write(new, root, "list" if list_file else "imagefolder", state, settings, classes, names, labels,
                       missing)
    except OSError as e:
        raise UserError(f"data.index: cannot write the index {new!r} ({e.strerror}); set data.index to a writable "
                        f"path or MFF_DS_CACHE to a writable folder") from None
    size, took = os.path.getsize(new), time.perf_counter() - t
    if loud or took >= SAY_AFTER_S:
        say(f"{len(names):,} files of {list_file or root} -> {new} ({size / 2**20:.1f} MiB, "
            f"{size / max(len(names), 1):.0f} B per file) in {took:.1f} s")
    return new, digest_of(header)


def _left_out(index):
    m = index.missing
    return (f"{m['count']:,} listed file(s) are missing and left out (data.allow_missing), e.g. "
            f"{', '.join(map(repr, m['examples']))}" if m else None)


# ------------------------------------------------------------------------------------- one index per run
def open_index(root, index=None, allow_missing=False):
    """The mapped Index of `root` (or list file `index`) for this process. Under torch.distributed (every rank
    calls it, in the same order): rank 0 checks or builds it and says where it is; the first rank of each other node
    maps it when that node sees it and it lists that node's data as it is now, else finds or builds its own (nodes
    with their own copies of the data); the nodes then compare what their indexes hold (the content digest) and
    refuse to start, naming the first difference, when the copies differ; every rank maps its node's index."""
    with startup_phase("data_index"):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            found = Index.open(*ensure(root, index, allow_missing=allow_missing))
            if _left_out(found):
                say(_left_out(found))
            return found
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        got = [_attempt(lambda: ("ok", *ensure(root, index, allow_missing=allow_missing)), root, rank)] if rank == 0 \
            else [None]
        dist.broadcast_object_list(got, src=0)
        if got[0][0] == "error":
            raise UserError(got[0][1])
        _, path, digest = got[0]
        mine = None
        if local == 0 and rank != 0:
            mine = _attempt(lambda: ("ok", *_node_index(root, index, allow_missing, path, digest)), root, rank)
        elif rank == 0:
            mine = got[0]
        nodes = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, (host(), local, mine))
        errors = [m[1] for _, _, m in nodes if m is not None and m[0] == "error"]
        if errors:
            raise UserError(errors[0])
        differ = [r for r, (_, _, m) in enumerate(nodes) if m is not None and m[2] != digest]
        if differ:
            raise UserError(f"data.path: the data under {root!r} differs between nodes: "
                            f"{_first_difference(nodes, differ[0])}; expected the same files and labels on every "
                            f"node (copies of the data may differ in times and mount paths, not in what they hold)")
        leader = nodes[rank - local] if 0 <= rank - local < len(nodes) else None
        where = leader[2][1] if leader and leader[1] == 0 and leader[0] == host() and leader[2] else path
        found, why = None, None
        try:
            found = Index.open(where, digest)
        except DamagedIndex as e:
            why = (f"data index {where}: {e} (rank {rank} on {host()}); it changed during the start, or this node "
                   f"does not see the index its first rank found")
        opened = [None] * dist.get_world_size()
        dist.all_gather_object(opened, why)  # a rank that cannot map it stops every rank, not only itself
        if any(opened):
            raise UserError(next(w for w in opened if w))
        if rank == 0 and _left_out(found):
            say(_left_out(found))
        return found


def _attempt(fn, root, rank):
    """fn() or ("error", one line): every rank then hears of it in the next collective instead of waiting."""
    try:
        return fn()
    except UserError as e:
        return "error", str(e) if rank == 0 else f"{e} (on {host()}, rank {rank})"
    except Exception as e:  # noqa: BLE001 (the others wait in a collective: they hear of it and end too)
        return "error", f"rank {rank} on {host()} could not index {root!r} ({type(e).__name__}: {e})"


def _node_index(root, index, allow_missing, path, digest):
    """On a node other than rank 0's: rank 0's index when this node sees it and it lists this node's data as it is
    now; else this node's own (found or built in this host's cache)."""
    try:
        header, _ = read_header(path)
        settings = header["settings"] if header["source"] == "list" else {}
        if digest_of(header) == digest and stale_reason(header, os.path.abspath(root), settings) is None:
            return path, digest
    except (DamagedIndex, UserError, OSError):
        pass
    return ensure(root, index, allow_missing=allow_missing, progress=False, node=True)


def _summary(index):
    """(classes, count, a hash of every CHUNK entries): where two listings first differ, without sending them."""
    o, n = index.offsets, len(index)
    hashes = []
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        h = hashlib.blake2b(digest_size=8)
        for arr in (np.diff(o[a:b + 1]), index.labels[a:b], index.names[o[a]:o[b]]):
            h.update(np.ascontiguousarray(arr).tobytes())
        hashes.append(h.hexdigest())
    return index.classes, n, hashes


def _entries(index, chunk):
    a = chunk * CHUNK
    return [(index.name(i), int(index.labels[i])) for i in range(a, min(a + CHUNK, len(index)))]


def _first_difference(nodes, other):
    """Collective (every rank calls it): the first difference between rank 0's listing and that of the node led by
    rank `other`, in words."""
    import torch.distributed as dist
    rank = dist.get_rank()
    mine = nodes[rank][2]
    share = [None] * len(nodes)
    dist.all_gather_object(share, _summary(Index.open(mine[1])) if rank in (0, other) else None)
    (c0, n0, h0), (c1, n1, h1) = share[0], share[other]
    a, b = f"{nodes[0][0]} (rank 0)", f"{nodes[other][0]} (rank {other})"
    if c0 != c1:
        c0, c1 = c0 or [], c1 or []
        at = next((i for i, (x, y) in enumerate(zip(c0, c1)) if x != y), min(len(c0), len(c1)))
        what = lambda c: repr(c[at]) if at < len(c) else "nothing"  # noqa: E731
        return (f"the class folders differ: {a} has {len(c0)}, {b} {len(c1)}; the first difference is class {at}: "
                f"{what(c0)} on {a}, {what(c1)} on {b}")
    chunk = next((i for i, (x, y) in enumerate(zip(h0, h1)) if x != y), min(len(h0), len(h1)))
    dist.all_gather_object(share, _entries(Index.open(mine[1]), chunk) if rank in (0, other) else None)
    e0, e1 = share[0], share[other]
    at = next((i for i, (x, y) in enumerate(zip(e0, e1)) if x != y), min(len(e0), len(e1)))
    pos = chunk * CHUNK + at
    what = lambda e: f"{e[at][0]!r} (label {e[at][1]})" if at < len(e) else "nothing"  # noqa: E731
    return (f"{a} lists {n0:,} files, {b} {n1:,}; the first difference is file {pos:,} of the listing: {what(e0)} "
            f"on {a}, {what(e1)} on {b}")


# ------------------------------------------------------------------------------------------ the command
def main(argv=None):
    """mff-ds index DATA_DIR [--out FILE] [--list FILE] [--allow-missing] [--force]: list an ImageFolder once (or
    read and check a list file) into the index every run of it then maps; says where it is and what it holds."""
    import argparse
    ap = argparse.ArgumentParser(prog="mff-ds index", description=main.__doc__.split(":", 1)[1].strip(),
                                 allow_abbrev=False)
    ap.add_argument("data_dir", help="the ImageFolder root (the recipe's data.path)")
    ap.add_argument("--out", default=None, help=f"the index file (default: DATA_DIR/{INDEX_NAME}, or this host's "
                    "file in the cache folder when DATA_DIR is read-only or --list is given); then set data.index "
                    "to it")
    ap.add_argument("--list", default=None, help="an mmpretrain list file (`relative/path label` lines, e.g. "
                    "meta/train.txt) to read instead of listing DATA_DIR; every listed file must be there")
    ap.add_argument("--allow-missing", action="store_true", help="with --list: leave out listed files that are not "
                    "there (named) instead of refusing; runs then need data.allow_missing: true")
    ap.add_argument("--force", action="store_true", help="list again even when the index is fresh")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.allow_missing and not a.list:
        return _fail("--allow-missing: only list files (--list) name files that can be missing")
    try:
        path, _ = ensure(a.data_dir, a.list or a.out, progress=not a.no_progress, force=a.force,
                         allow_missing=a.allow_missing, out=a.out if a.list else None)
        index = Index.open(path)
    except (UserError, DamagedIndex) as e:
        return _fail(str(e))
    size, n = os.path.getsize(path), len(index)
    classes = f"{len(index.classes)} classes" if index.classes else "no class names"
    left = f"; {_left_out(index)}" if _left_out(index) else ""
    print(f"{path}: {n:,} files, {classes}, {size / 2**20:.1f} MiB ({size / max(n, 1):.0f} B per file){left}; "
          f"runs of {os.path.abspath(a.data_dir)} use it" + (f" with data.index={a.out or a.list}" if a.out or a.list
                                                             else "")
          + (" and data.allow_missing: true" if a.allow_missing else ""))
    return 0


def _fail(line):
    print(f"mff-ds index: {line}", file=sys.stderr)
    return 2
