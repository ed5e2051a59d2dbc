"""python -m mff_ds.zoo list | fetch NAME...: the released checkpoints, and filling the cache ahead of a job."""
import argparse
import sys

from mff_ds.common import UserError

from . import entries, fetch, is_cached, recorded

COLUMNS = ("name", "kind", "params", "result", "file", "sha256", "cached")


def rows() -> list:
    """One dict per entry: what `list` prints (the file name matches the publisher's page)."""
    return [{"name": e.name, "kind": e.kind, "params": f"{e.params:.1f}M" if e.params else "-", "result": e.result,
             "file": e.filename, "sha256": e.sha256 or _recorded(e),
             "cached": "yes" if is_cached(e) else "no"} for e in entries().values()]


def _recorded(e) -> str:
    sha = recorded(e)
    return f"{sha[:8]} (recorded)" if sha else "recorded on first download"


def table(rows: list) -> str:
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    return "\n".join("  ".join(r[c].ljust(width[c]) for c in COLUMNS).rstrip()
                     for r in [dict(zip(COLUMNS, COLUMNS))] + rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m mff_ds.zoo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", allow_abbrev=False,
                   help="every entry: what it is, params, reported result, source file, cached or not")
    f = sub.add_parser("fetch", allow_abbrev=False,
                       help="download and verify entries into the cache (e.g. before a cluster job)")
    f.add_argument("names", nargs="+")
    a = p.parse_args(argv)
    try:
        if a.command == "list":
            print(table(rows()))
        for name in getattr(a, "names", []):
            print(f"{name}: {fetch(name)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
