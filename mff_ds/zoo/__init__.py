"""Released checkpoints by name: `fetch(name)` -> a verified local file, `resolve(path_or_name)` for every command
that takes a checkpoint. The entries are data (mff_ds/zoo/table.py), plus the user's own in the YAML / JSON files
that MFF_DS_ZOO_EXTRA names (os.pathsep-separated; a list of entries with the same keys).

Files land in `cache_dir()/zoo` ($MFF_DS_CACHE, else $XDG_CACHE_HOME/mff_ds, else ~/.cache/mff_ds), downloaded by
torch.hub.download_url_to_file (progress bar, SHA-256 prefix check) into a temporary file that replaces nothing
until every check passed. Entries without a published SHA-256 get theirs recorded beside the file on first download
(`FILE.sha256`, trust on first use); every later use checks the file against it. One process per file downloads,
the others wait on a file lock (ranks of one job). MFF_DS_ZOO_MIRROR=DIR_OR_URL fetches the same file names from a
shared folder or an internal HTTP server instead.
"""
import difflib
import hashlib
import os
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import ValidationError, field_validator

from mff_ds.common import MissingFileError, UserError, atomic_write, cache_dir, write_text
from mff_ds.schema import Section, problems_of

from .table import ENTRIES

__all__ = ["Entry", "entries", "fetch", "resolve", "check_source", "as_given", "zoo_dir", "is_cached"]


class Entry(Section):
    """One released file (mff_ds/zoo/table.py explains the keys)."""
    name: str
    url: str
    kind: Literal["pretrained encoder+decoder", "pretrained encoder", "classifier", "linear probe"]
    arch: str
    sha256: Optional[str] = None  # hex prefix (8 digits in mmpretrain file names) or the whole digest
    md5: Optional[str] = None
    recipe: str = ""
    result: str = ""
    params: Optional[float] = None
    page: str = ""

    @field_validator("sha256", "md5")
    @classmethod
    def _hex(cls, v):
        if v is not None and (not v or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError(f"expected lowercase hex digits, got {v!r}")
        return v

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


def _extra() -> list:
    import yaml
    out = []
    for path in filter(None, os.environ.get("MFF_DS_ZOO_EXTRA", "").split(os.pathsep)):
        if not os.path.isfile(path):
            raise MissingFileError(f"MFF_DS_ZOO_EXTRA: expected a YAML or JSON file of zoo entries, got {path!r} "
                                   f"(no such file)")
        with open(path) as f:
            items = yaml.safe_load(f) or []
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a list of zoo entries, got a {type(items).__name__}")
        out += items
    return out


def _entry(raw) -> Entry:
    try:
        return Entry.model_validate(raw)
    except ValidationError as e:
        name = raw.get("name", "?") if isinstance(raw, dict) else raw
        raise UserError(f"zoo entry {name!r}: " + "; ".join(problems_of(e, Entry))) from None


def entries() -> dict:
    """name -> Entry: the table's, then MFF_DS_ZOO_EXTRA's (read on every call: the environment may change)."""
    out = {}
    for e in map(_entry, ENTRIES + _extra()):
        if e.name in out:
            raise UserError(f"zoo: expected one entry named {e.name!r}, got two (MFF_DS_ZOO_EXTRA repeats a name?)")
        out[e.name] = e
    return out


def zoo_dir() -> Path:
    return cache_dir() / "zoo"


def is_cached(e: Entry) -> bool:
    return (zoo_dir() / e.filename).is_file()


def recorded(e: Entry) -> Optional[str]:
    """The SHA-256 recorded beside the cached file (None when there is none yet)."""
    side = _sidecar(zoo_dir() / e.filename)
    return side.read_text().strip() if side.is_file() else None


def _unknown(source) -> str:
    close = difflib.get_close_matches(str(source), list(entries()), n=3, cutoff=0.5)
    hint = f"closest zoo names: {', '.join(close)}" if close else "no zoo name is close"
    return (f"{source}: expected an existing file or a zoo name, got neither ({hint}; "
            f"`python -m mff_ds.zoo list` lists them)")


def check_source(source):
    """For recipe validators: an existing path or a zoo name passes (nothing is downloaded), else ValueError."""
    if source is not None and not os.path.exists(source) and source not in entries():
        raise ValueError(_unknown(source))
    return source


def as_given(source: str) -> str:
    """A path from a command line made absolute (the recipe outlives the working directory); a zoo name that is
    no path here stays as it is."""
    return source if source in entries() and not os.path.exists(source) else os.path.abspath(source)


def resolve(source):
    """A path that exists passes through unchanged; a zoo name -> its verified local file (fetched when needed);
    anything else -> MissingFileError naming the closest zoo names. None stays None."""
    if source is None or os.path.exists(source):
        return source
    if source in entries():
        return str(fetch(source))
    raise MissingFileError(_unknown(source))


def get(name: str) -> Entry:
    table = entries()
    if name not in table:
        raise MissingFileError(_unknown(name))
    return table[name]


def fetch(name: str, progress: bool = True) -> Path:
    """The entry's file in the cache, downloaded once (other processes wait on the lock) and checked on every use."""
    from filelock import FileLock
    e = get(name)
    dst = zoo_dir() / e.filename
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dst}.lock"):
        if dst.is_file():
            _check_cached(e, dst)
        else:
            _download(e, dst, progress)
    return dst


def source_url(e: Entry) -> str:
    """Where the file comes from: MFF_DS_ZOO_MIRROR (a folder or a URL holding the same file names), else e.url."""
    mirror = os.environ.get("MFF_DS_ZOO_MIRROR")
    if not mirror:
        return e.url
    base = mirror if "://" in mirror else Path(mirror).expanduser().resolve().as_uri()
    return f"{base.rstrip('/')}/{e.filename}"


def _download(e: Entry, dst: Path, progress: bool) -> None:
    from urllib.error import HTTPError, URLError
    from torch.hub import download_url_to_file
    url = source_url(e)

    def write(tmp):
        try:
            download_url_to_file(url, tmp, hash_prefix=e.sha256, progress=progress)
        except RuntimeError as err:  # torch.hub's 'invalid hash value (expected "...", got "...")'; file deleted
            if "invalid hash value" not in str(err):
                raise
            raise UserError(f"{e.name}: refused the file from {url}: SHA-256 {err}; it was deleted") from None
        except HTTPError as err:
            raise UserError(f"{e.name}: {url} answered HTTP {err.code} {err.reason}") from None
        except (URLError, OSError) as err:
            where = ("the mirror (MFF_DS_ZOO_MIRROR)" if os.environ.get("MFF_DS_ZOO_MIRROR") else
                     "a folder or URL that MFF_DS_ZOO_MIRROR names")
            raise MissingFileError(f"{e.name}: cannot download {url} ({getattr(err, 'reason', err)}); without internet, "
                                   f"put the file at {dst} or {e.filename} in {where}") from None
        _record(e, Path(tmp), _sha256_checked(e, Path(tmp), url), sidecar=_sidecar(dst))
    atomic_write(dst, write)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _digests(path: Path) -> dict:
    h = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            for d in h.values():
                d.update(chunk)
    return {k: d.hexdigest() for k, d in h.items()}


def _sha256_checked(e: Entry, path: Path, where) -> str:
    """The file's SHA-256, after checking it (and its MD5) against what the publisher gives."""
    got = _digests(path)
    for algo in ("sha256", "md5"):
        want = getattr(e, algo)
        if want and not got[algo].startswith(want):
            raise UserError(f"{e.name}: refused the file from {where}: {algo.upper()} expected {want}..., "
                            f"got {got[algo]}; it was deleted")
    return got["sha256"]


def _record(e: Entry, path: Path, sha: str, sidecar: Path) -> None:
    write_text(sidecar, sha + "\n")
    if not e.sha256:
        print(f"zoo: {e.name}: no SHA-256 is published; recorded {sha} in {sidecar} (trust on first use: every "
              f"later use is checked against it)", file=sys.stderr)


def _check_cached(e: Entry, dst: Path) -> None:
    """A cached file must match the table and the SHA-256 recorded beside it; a file put there by hand (no record
    yet) is checked against the table and recorded. A mismatch deletes it, so the next fetch downloads afresh."""
    side = _sidecar(dst)
    if not side.is_file():
        try:
            return _record(e, dst, _sha256_checked(e, dst, dst), side)
        except UserError:
            dst.unlink()
            raise
    want, got = side.read_text().strip(), _digests(dst)["sha256"]
    if got != want or (e.sha256 and not got.startswith(e.sha256)):
        dst.unlink()
        side.unlink()
        raise UserError(f"{e.name}: the cached {dst} changed since it was verified: SHA-256 expected {want}, got "
                        f"{got}; deleted it (fetch again to download it afresh)")
