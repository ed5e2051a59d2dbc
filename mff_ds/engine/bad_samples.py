"""OUTPUT_DIR/bad_samples/rank<R>.tsv: every sample the loader skipped, written and read back.

The format: a header line, then one record per line (lines end with "\\n"), five tab-separated fields:
    step    epoch    batch    sample    reason
step (the optimizer step that would have used the sample), epoch and batch are decimal integers. In `sample` (the
file or shard:member) and `reason` these characters are escaped, and nothing else:
    backslash -> \\\\    tab -> \\t    newline -> \\n    carriage return -> \\r
    U+DC80..U+DCFF -> \\xNN: a byte 0xNN of a file name that is not UTF-8, as os.fsdecode gives it
    (os.fsencode(sample) is the name on disk)
    any other lone surrogate U+D800..U+DFFF -> \\uXXXX
so the file is always valid UTF-8, writing never fails on an encoding, and any text round-trips exactly
(`read` gives back what `append` was given). Reading, an unknown escape is kept as written.
"""
import os
import re
from typing import NamedTuple

HEADER = "step\tepoch\tbatch\tsample\treason"

_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNSHORT = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_SPECIAL = re.compile("[\\\\\t\n\r\ud800-\udfff]")
_ESCAPE = re.compile(r"\\(x[89a-f][0-9a-f]|u[0-9a-f]{4}|[\\tnr])")


class Record(NamedTuple):
    step: int
    epoch: int
    batch: int
    sample: str
    reason: str


def _escape_char(m) -> str:
    c = m.group()
    if c in _SHORT:
        return _SHORT[c]
    return f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"


def _unescape_char(m) -> str:
    e = m.group(1)
    if e[0] == "x":
        return chr(0xDC00 + int(e[1:], 16))
    return chr(int(e[1:], 16)) if e[0] == "u" else _UNSHORT[e]


def escape(text: str) -> str:
    return _SPECIAL.sub(_escape_char, text)


def unescape(field: str) -> str:
    return _ESCAPE.sub(_unescape_char, field)


def rank_file(output_dir: str, rank: int) -> str:
    return os.path.join(output_dir, "bad_samples", f"rank{rank:03d}.tsv")


def append(path: str, step: int, records) -> None:
    """Add (epoch, batch, sample, reason) records, all with `step`; the header first in a new file. A sample given
    as bytes or a path is written as os.fsdecode gives it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lines = []
    for epoch, batch, sample, reason in records:
        sample = os.fsdecode(sample) if isinstance(sample, (bytes, os.PathLike)) else str(sample)
        lines.append(f"{int(step)}\t{int(epoch)}\t{int(batch)}\t{escape(sample)}\t{escape(str(reason))}\n")
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            lines.insert(0, HEADER + "\n")
        else:
            f.seek(end - 1)
            if f.read(1) != b"\n":  # a line cut short (a killed run): end it
                lines.insert(0, "\n")
        f.write("".join(lines).encode("utf-8"))


def read(path: str) -> list:
    """The file's records ([] when there is none); lines that are not a record (the header, one cut short) are
    left out."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    records = []
    for line in text.split("\n"):
        fields = line.split("\t")
        if len(fields) != 5:
            continue
        try:
            step, epoch, batch = (int(x) for x in fields[:3])
        except ValueError:
            continue
        records.append(Record(step, epoch, batch, unescape(fields[3]), unescape(fields[4])))
    return records
