"""The dataset index (mff_ds/data/index.py): the listing it keeps is the one the ImageFolder scan made, a fresh index
costs one read of the root directory, a stale or damaged one is rebuilt and said (also when a tool restored the
folders' mtimes), list files are read and checked, in a 2-rank start exactly one process lists the tree, and nodes
with their own copies of the data agree on what they hold. Directory reads are counted with Python's audit events
(os.scandir / os.listdir; os.walk goes through os.scandir), not timed."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forkserver
from mff_ds.common import UserError
from mff_ds.data import DataConfig, build_loader
from mff_ds.data import index as idx
from mff_ds.data.index import IMG_EXTENSIONS

REPO = Path(__file__).resolve().parents[1]
READS = []  # directory reads since the last reads() call, while counting
_COUNTING = [False]


def _audit(event, args):
    if _COUNTING[0] and event in ("os.scandir", "os.listdir"):
        READS.append(os.fsdecode(args[0]) if args and args[0] is not None else ".")


sys.addaudithook(_audit)  # (hooks cannot be removed: this one only records while counting)


def reads(fn, *a, **kw):
    """(fn's result, the directories it read)."""
    READS.clear()
    _COUNTING[0] = True
    try:
        return fn(*a, **kw), list(READS)
    finally:
        _COUNTING[0] = False


def scan_reference(root):
    """The ImageFolder scan the index replaces (mff_ds 2026-12-06), kept as the reference of its order."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    samples = [(e.path, -1) for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    for label, c in enumerate(classes):
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            dirnames.sort()
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                        if f.lower().endswith(IMG_EXTENSIONS)]
    return samples, classes


def listing(index, root):
    return [(os.path.join(root, index.name(i)), int(index.labels[i])) for i in range(len(index))]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tree(root, files):
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MFF_DS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


NAME = st.text(st.characters(codec="utf-8", exclude_characters="/\0", exclude_categories=("Cs",)), min_size=1,
               max_size=8).filter(lambda s: s not in (".", ".."))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(NAME, max_size=2), NAME, st.sampled_from([".jpg", ".JPEG", ".png", ".txt", ""])),
                min_size=1, max_size=25))
def test_the_index_lists_what_the_scan_listed_in_its_order(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("tree")
    for dirs, name, ext in files:
        try:
            make_tree(root, [os.path.join("c" + (dirs[0] if dirs else ""), *dirs[1:], name + ext)])
        except OSError:  # a name the filesystem refuses (too long, or a file where a folder is wanted)
            pass
    ref, classes = scan_reference(str(root))
    if not ref:
        with pytest.raises(UserError, match="no image files"):
            idx.ensure(str(root), progress=False)
        return
    index = idx.Index.open(idx.ensure(str(root), progress=False)[0])
    assert listing(index, str(root)) == ref and index.classes == classes


def test_a_flat_roots_index_inside_it_stays_fresh_and_sees_a_changed_file(tmp_path, capfd):
    """Unlabelled files directly under the root (ImageNet val): label -1. The index written inside the root (beside
    the data, or --out there) changes the root's times; it is compared by the names the root holds, read in the one
    directory read a check makes, so it stays fresh, and a file added or renamed is seen."""
    root = make_tree(tmp_path / "flat", ["b.jpg", "a.PNG", "notes.txt", ".hidden/x.jpg"])
    path, _ = idx.ensure(str(root), progress=False)
    assert path == str(root / idx.INDEX_NAME)
    index = idx.Index.open(path)
    assert listing(index, str(root)) == scan_reference(str(root))[0] and index.classes is None
    inside = str(root / "val.index")  # --out inside the root
    assert idx.ensure(str(root), inside, progress=False)[0] == inside
    for p in (None, inside):
        (again, _), dirs = reads(idx.ensure, str(root), p, progress=False)
        assert again == (p or path) and dirs == [str(root)], dirs  # fresh: one read of the root
    assert capfd.readouterr().err == ""
    os.rename(root / "b.jpg", root / "c.jpg")
    os.utime(root, ns=(os.stat(root).st_atime_ns, os.stat(path).st_mtime_ns))  # whatever the times say
    capfd.readouterr()
    assert listing(idx.Index.open(idx.ensure(str(root), inside, progress=False)[0]), str(root)) == \
        scan_reference(str(root))[0]
    assert "is stale (1 changed (e.g. <root>)); listing" in capfd.readouterr().err


def test_a_fresh_index_costs_one_read_of_the_root_and_no_listing(tmp_path, capfd):
    root = make_tree(tmp_path / "data", [f"c{k}/{i}.jpg" for k in range(5) for i in range(3)])
    (path, digest), dirs = reads(idx.ensure, str(root), progress=False)
    dirs = [d for d in dirs if d.startswith(str(root))]  # (and the cache folder, for other hosts' indexes)
    assert len(dirs) == 6 and path == str(root / idx.INDEX_NAME)  # the root + 5 class folders, once
    assert capfd.readouterr().err == ""  # a first listing this short goes unsaid
    (again, digest2), dirs = reads(idx.ensure, str(root), progress=False)
    assert (again, digest2) == (path, digest) and dirs == [str(root)]
    assert capfd.readouterr().err == ""


def restore_times(folder, st):
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))  # as tar and rsync -t do


@pytest.mark.parametrize("change, said", [("add", "1 changed (e.g. c1)"), ("remove", "1 changed (e.g. c0)"),
                                          ("rename", "1 changed (e.g. c0)"), ("sub-folder", "1 changed (e.g. c1/s)"),
                                          ("new class", "1 added (e.g. c9)"), ("drop class", "1 removed (e.g. c2)")])
def test_a_stale_index_is_found_from_the_folders_rebuilt_and_said(tmp_path, capfd, change, said):
    """Found even when the change restored the folder's mtime: the ctime, which no tool sets back, changed."""
    root = make_tree(tmp_path / "data", [f"c{k}/{i}.jpg" for k in range(3) for i in range(3)] + ["c1/s/x.jpg"])
    idx.ensure(str(root), progress=False)
    c0, c1, s = (os.stat(root / d) for d in ("c0", "c1", "c1/s"))
    if change == "add":
        (root / "c1" / "new.jpg").write_bytes(b"x")
        restore_times(root / "c1", c1)
    elif change == "remove":
        os.remove(root / "c0" / "0.jpg")
        restore_times(root / "c0", c0)
    elif change == "rename":
        os.rename(root / "c0" / "0.jpg", root / "c0" / "9.jpg")
        restore_times(root / "c0", c0)
    elif change == "sub-folder":  # deeper than the class folder, whose times do not change
        (root / "c1" / "s" / "y.jpg").write_bytes(b"x")
        restore_times(root / "c1" / "s", s)
    elif change == "new class":
        make_tree(root, ["c9/a.jpg"])
    else:
        for f in (root / "c2").iterdir():
            f.unlink()
        (root / "c2").rmdir()
    capfd.readouterr()
    path, _ = idx.ensure(str(root), progress=False)
    err = capfd.readouterr().err
    assert f"is stale ({said}); listing" in err, err
    assert listing(idx.Index.open(path), str(root)) == scan_reference(str(root))[0]


def test_the_index_format_round_trips_and_any_changed_byte_is_refused_or_harmless(tmp_path):
    names = [os.fsencode(n) for n in ("a/1.jpg", "b/ü 2.png", "b/x\udcff.jpg", "c/d/e/f.JPEG")]
    path = str(tmp_path / "i.index")
    header = idx.write(path, "/r", "imagefolder", [["a", 1, 2]], {}, ["a", "b", "c"], names, [0, 1, 1, 2])
    index = idx.Index.open(path, idx.digest_of(header))
    assert [index.name(i) for i in range(4)] == [os.fsdecode(n) for n in names]
    assert index.labels.tolist() == [0, 1, 1, 2] and index.classes == ["a", "b", "c"]
    assert isinstance(index.names, np.memmap) and not index.names.flags.writeable  # mapped read-only
    raw = Path(path).read_bytes()

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, len(raw) - 1), st.integers(1, 255))
    def flip(at, xor):
        Path(path).write_bytes(raw[:at] + bytes([raw[at] ^ xor]) + raw[at + 1:])
        try:
            got = idx.Index.open(path)
        except idx.DamagedIndex:
            return
        assert [got.name(i) for i in range(len(got))] == [index.name(i) for i in range(4)]  # padding, whitespace
        assert got.labels.tolist() == [0, 1, 1, 2] and got.classes == index.classes
    flip()
    for cut in (0, 5, 16, len(raw) // 2, len(raw) - 1):
        Path(path).write_bytes(raw[:cut])
        with pytest.raises(idx.DamagedIndex):
            idx.Index.open(path)


def test_a_damaged_index_is_rebuilt_never_used(tmp_path, capfd):
    root = make_tree(tmp_path / "data", ["a/1.jpg", "a/2.jpg", "b/3.jpg"])
    path, _ = idx.ensure(str(root), progress=False)
    raw = bytearray(Path(path).read_bytes())
    raw[-70] ^= 0x41  # inside the names
    Path(path).write_bytes(bytes(raw))
    capfd.readouterr()
    again, _ = idx.ensure(str(root), progress=False)
    assert again == path and "is damaged (checksum mismatch); listing" in capfd.readouterr().err
    assert listing(idx.Index.open(path), str(root)) == scan_reference(str(root))[0]


def test_a_read_only_root_puts_the_index_in_the_cache_and_a_later_run_finds_it(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "data", ["a/1.jpg", "b/2.jpg"])
    monkeypatch.setattr(idx.os, "access", lambda p, mode: False)
    path, _ = idx.ensure(str(root), progress=False)
    assert Path(path).parent == cache / "index" and not (root / idx.INDEX_NAME).exists()
    (again, _), dirs = reads(idx.ensure, str(root), progress=False)
    assert again == path and dirs == [str(root)]


def test_a_list_file_is_read_and_every_listed_file_checked_in_the_folders_it_names(tmp_path):
    """Spaces or a tab before the label; the folders the list names are read once (to check every file is there),
    never the others; a line of one word is unlabelled."""
    root = make_tree(tmp_path / "data", ["n01/a b.JPEG", "val_0001.JPEG", "unlabelled.jpg", "n02/unlisted.jpg"])
    lst = tmp_path / "train.txt"
    lst.write_text("n01/a b.JPEG 3\n\nval_0001.JPEG\t0\r\nunlabelled.jpg\n")
    (path, _), dirs = reads(idx.ensure, str(root), str(lst), progress=False)
    assert sorted(d for d in dirs if d.startswith(str(root))) == [str(root), str(root / "n01")]
    index = idx.Index.open(path)
    assert [index.name(i) for i in range(3)] == ["n01/a b.JPEG", "val_0001.JPEG", "unlabelled.jpg"]
    assert index.labels.tolist() == [3, 0, -1] and index.classes is None and index.missing is None
    (again, _), dirs = reads(idx.ensure, str(root), str(lst), progress=False)
    assert again == path and not [d for d in dirs if d.startswith(str(root))]  # fresh: stats only


@pytest.mark.parametrize("line, said", [
    ("n01/a.JPEG three", "train.txt:1: expected `relative/path label` (an integer label after spaces or a tab), got "
                         "'n01/a.JPEG three'"),
    ("n01/a.JPEG 2147483648", "train.txt:1: expected a label in [0, 2147483647] (or -1: unlabelled), got 2147483648"),
    ("n01/a.JPEG -2", "train.txt:1: expected a label in [0, 2147483647] (or -1: unlabelled), got -2")])
def test_a_bad_label_is_refused_in_one_line_naming_the_line(tmp_path, line, said):
    root = make_tree(tmp_path / "data", ["n01/a.JPEG"])
    lst = tmp_path / "train.txt"
    lst.write_text(f"n01/a.JPEG 1\n{line}\n".replace("n01/a.JPEG 1\n", "", 1))
    with pytest.raises(UserError) as e:
        idx.ensure(str(root), str(lst), progress=False)
    assert str(e.value) == f"data.index: {lst.parent}/{said}"


def test_listed_files_that_are_not_there_are_refused_or_left_out_and_named(tmp_path, capfd):
    root = make_tree(tmp_path / "data", ["a/1.jpg", "a/2.jpg", "b/3.jpg"])
    lst = tmp_path / "train.txt"
    lst.write_text("a/1.jpg 0\na/gone.jpg 0\nb/3.jpg 1\nc/x.jpg 2\n")
    with pytest.raises(UserError) as e:
        idx.ensure(str(root), str(lst), progress=False)
    assert str(e.value) == (f"data.index: 2 of the 4 files {lst} lists are not under {str(root)!r} (e.g. 'a/gone.jpg', "
                            f"'c/x.jpg'); expected every listed file, or data.allow_missing: true (mff-ds index "
                            f"--allow-missing) to leave them out")
    path, _ = idx.ensure(str(root), str(lst), progress=False, allow_missing=True)
    index = idx.Index.open(path)
    assert [index.name(i) for i in range(len(index))] == ["a/1.jpg", "b/3.jpg"] and index.labels.tolist() == [0, 1]
    assert index.missing == {"count": 2, "examples": ["a/gone.jpg", "c/x.jpg"]}
    capfd.readouterr()
    idx.open_index(str(root), str(lst), allow_missing=True)  # every start says what it leaves out
    assert "2 listed file(s) are missing and left out (data.allow_missing), e.g. 'a/gone.jpg'" in capfd.readouterr().err
    os.remove(root / "a" / "1.jpg")  # a listed file removed later: the index is stale, the check runs again
    with pytest.raises(UserError, match="3 of the 4 files"):
        idx.ensure(str(root), str(lst), progress=False)


def test_an_index_made_from_a_list_file_is_used_as_written(tmp_path):
    """`mff-ds index ROOT --list L --out F`, then data.index: F is that list's index: its labels, its files, checked
    and rebuilt from the list, never from a listing of the folder (which would drop the list's labels)."""
    root = make_tree(tmp_path / "data", ["a/1.jpg", "a/2.jpg", "b/3.jpg"])
    lst, out = tmp_path / "train.txt", tmp_path / "train.index"
    lst.write_text("b/3.jpg 7\na/1.jpg 5\n")
    assert idx.main([str(root), "--list", str(lst), "--out", str(out), "--no-progress"]) == 0
    cached, _ = idx.ensure(str(root), str(lst), progress=False)  # the list itself: its index in the cache
    for given in (str(out), cached):  # either index named as data.index
        (path, _), dirs = reads(idx.ensure, str(root), given, progress=False)
        index = idx.Index.open(path)
        assert path == given and [index.name(i) for i in range(len(index))] == ["b/3.jpg", "a/1.jpg"]
        assert index.labels.tolist() == [7, 5] and not [d for d in dirs if d.startswith(str(root))]  # fresh
    lst.write_text("a/2.jpg 4\n")  # the list changed: rebuilt from it, where it is
    path, _ = idx.ensure(str(root), str(out), progress=False)
    index = idx.Index.open(path)
    assert path == str(out) and [index.name(0)] == ["a/2.jpg"] and index.labels.tolist() == [4]


def test_a_list_file_in_scan_order_gives_the_folders_batches(tmp_path):
    """data.index = an mmpretrain list file of the same files gives the same stream as listing the folder."""
    from PIL import Image
    root = tmp_path / "data"
    for k in range(3):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (24 + 3 * i, 20 + k), (40 * i, 60 * k, 90)).save(root / f"c{k}" / f"{i}.png")
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{p[len(str(root)) + 1:]} {label}\n" for p, label in scan_reference(str(root))[0]))

    def batches(index):
        cfg = DataConfig(source="imagefolder", path=str(root), index=index, num_workers=0, augment="mae", decode="cpu")
        loader = build_loader(cfg, img_size=16, micro_batch=4, rank=0, world_size=1, seed=1, epoch=0)
        return [(x.clone(), y.clone()) for x, y in loader]
    a, b = batches(None), batches(str(lst))
    assert len(a) == 3 and all((x == u).all() and (y == v).all() for (x, y), (u, v) in zip(a, b))
    part = tmp_path / "part.txt"  # and the list is what is read: 8 of the 15 files make 2 batches, not 3
    part.write_text("".join(lst.read_text().splitlines(keepends=True)[:8]))
    assert len(batches(str(part))) == 2


def test_the_index_key_is_refused_for_sources_that_read_none():
    from mff_ds.engine.recipe import RecipeError
    from mff_ds.eval.recipe import from_dict
    with pytest.raises(ValueError, match=r"(?s)index.*expected null: source 'webdataset' reads no index"):
        DataConfig(source="webdataset", path="x-{0..1}.tar", index="i")
    with pytest.raises(RecipeError, match=r"data.val_index: expected null: source 'digits'"):
        from_dict({"task": "linprobe", "model": "vit-tiny", "data": {"source": "digits", "val_index": "v.txt"}})


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    root, out = sys.argv[1], sys.argv[2]
    reads = []
    sys.addaudithook(lambda ev, a: reads.append(os.fsdecode(a[0])) if ev in ("os.scandir", "os.listdir")
                     and a and a[0] is not None and os.fsdecode(a[0]).startswith(root) else None)
    import torch.distributed as dist
    dist.init_process_group("gloo")
    from mff_ds.common import UserError
    from mff_ds.data.index import open_index
    try:
        index = open_index(root, None)
        got = {"reads": reads, "n": len(index), "path": index.path}
    except UserError as e:
        got = {"error": str(e)}
    json.dump(got, open(f"{out}.{dist.get_rank()}", "w"))
    dist.destroy_process_group()
""")


def test_in_a_two_rank_start_exactly_one_process_lists_the_tree(tmp_path):
    root = make_tree(tmp_path / "data", [f"c{k}/{i}.jpg" for k in range(4) for i in range(5)])
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)

    def start(name, data=root):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(data), str(tmp_path / name)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MFF_DS_CACHE=str(tmp_path / "cache"))
        p = forkserver.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return [json.loads((tmp_path / f"{name}.{r}").read_text()) for r in range(2)]
    first = start("first")
    assert len(first[0]["reads"]) == 5 and first[1]["reads"] == []  # rank 0 lists (root + 4 classes); rank 1 maps
    assert first[0]["n"] == first[1]["n"] == 20 and first[0]["path"] == first[1]["path"]
    second = start("second")
    assert second[0]["reads"] == [str(root)] and second[1]["reads"] == []  # fresh: one read of the root
    missing = start("missing", tmp_path / "nowhere")  # rank 0's error reaches rank 1, which does not wait for it
    assert [r["error"] for r in missing] == [f"data.path: ImageFolder root {str(tmp_path / 'nowhere')!r} is not a "
                                             f"directory"] * 2


def test_mff_ds_index_says_what_it_wrote_and_refuses_bad_input_in_one_line(tmp_path):
    root = make_tree(tmp_path / "data", ["a/1.jpg", "b/2.jpg", "b/3.jpg"])
    env = dict(os.environ, MFF_DS_CACHE=str(tmp_path / "cache"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "mff_ds", "index", *a], capture_output=True, text=True,
                                    env=env, timeout=60)
    p = run(str(root), "--no-progress")
    assert p.returncode == 0 and p.stdout.startswith(f"{root / idx.INDEX_NAME}: 3 files, 2 classes"), p.stdout
    out = tmp_path / "elsewhere.index"
    p = run(str(root), "--out", str(out))
    assert p.returncode == 0 and f"with data.index={out}" in p.stdout and out.exists()
    for args, said in (((str(tmp_path / "nope"),), "is not a directory"),
                       ((str(root), "--list", str(tmp_path / "missing.txt")), "expected an existing list file")):
        p = run(*args)
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("mff-ds index: ") and said in p.stderr


def test_a_stale_index_beside_read_only_data_does_not_hide_the_fresh_one_in_the_cache(tmp_path, monkeypatch, capfd):
    root = make_tree(tmp_path / "data", ["a/1.jpg", "b/2.jpg"])
    idx.ensure(str(root), progress=False)  # beside the data
    make_tree(root, ["c/3.jpg"])  # now stale; and the data becomes read-only
    monkeypatch.setattr(idx.os, "access", lambda p, mode: False)
    first, _ = idx.ensure(str(root), progress=False)
    assert "is stale (1 added (e.g. c))" in capfd.readouterr().err
    (again, _), dirs = reads(idx.ensure, str(root), progress=False)
    assert again == first != str(root / idx.INDEX_NAME) and dirs == [str(root)]
    assert capfd.readouterr().err == ""  # found fresh in the cache: nothing listed, nothing said


def test_a_first_listing_that_takes_a_while_is_said(tmp_path, capfd, monkeypatch):
    root = make_tree(tmp_path / "data", ["a/1.jpg", "b/2.jpg"])
    monkeypatch.setattr(idx, "SAY_AFTER_S", 0.0)  # as a listing of a large tree on a network filesystem
    path, _ = idx.ensure(str(root), progress=False)
    assert capfd.readouterr().err.startswith(f"data index: 2 files of {root} -> {path} (")


def copy_later(src, dst):
    """A copy of the tree as staging it to another node makes: same paths, other mtimes and ctimes."""
    shutil.copytree(src, dst)
    for folder, _, _ in os.walk(dst):
        os.utime(folder, ns=(0, os.stat(folder).st_mtime_ns + 10**9 * 3600))
    return dst


def test_copies_with_other_times_and_mount_paths_agree_and_a_node_keeps_its_own(tmp_path, monkeypatch):
    """The digest ranks agree on covers what the index holds, not when or where it was made; a node whose copy rank
    0's index does not describe (other times) builds its own in this host's cache file, never over the one rank 0
    named, and later starts find it there."""
    a = make_tree(tmp_path / "a", [f"c{k}/{i}.jpg" for k in range(3) for i in range(3)])
    b = copy_later(a, tmp_path / "b")
    path_a, digest = idx.ensure(str(a), progress=False)
    monkeypatch.setattr(idx, "host", lambda: "node1")
    mine, same = idx._node_index(str(b), None, False, path_a, digest)  # rank 0 named a's index
    assert same == digest and mine.endswith(".node1.index") and idx.ensure(str(a), progress=False)[0] == path_a
    assert idx._node_index(str(b), None, False, path_a, digest) == (mine, digest)  # found there next time
    assert idx.ensure(str(tmp_path / "a"), progress=False)[1] == idx.ensure(str(b), force=True, progress=False)[1]
    os.remove(b / "c1" / "2.jpg")
    assert idx.ensure(str(b), progress=False)[1] != digest


def test_a_second_archive_extracted_into_the_same_folders_is_seen(tmp_path):
    """tar restores the class folders' mtimes from the archive, as it was when the index was made: the folders'
    ctimes still change, so the index is stale and lists all four files."""
    src = tmp_path / "src"
    for part, files in (("one", ["c0/1.jpg", "c1/2.jpg"]), ("two", ["c0/3.jpg", "c1/4.jpg"])):
        tree = make_tree(src / part, files)
        for d in ("c0", "c1"):  # the same folder times in both archives
            os.utime(tree / d, ns=(10**18, 10**18))
        subprocess.run(["tar", "-cf", str(tmp_path / f"{part}.tar"), "-C", str(tree), "c0", "c1"], check=True)
    root = tmp_path / "data"
    root.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "one.tar"), "-C", str(root)], check=True)
    assert len(idx.Index.open(idx.ensure(str(root), progress=False)[0])) == 2
    mtimes = [os.stat(root / d).st_mtime_ns for d in ("c0", "c1")]
    subprocess.run(["tar", "-xf", str(tmp_path / "two.tar"), "-C", str(root)], check=True)
    assert [os.stat(root / d).st_mtime_ns for d in ("c0", "c1")] == mtimes  # what hid the new files before
    index = idx.Index.open(idx.ensure(str(root), progress=False)[0])
    assert listing(index, str(root)) == scan_reference(str(root))[0] and len(index) == 4


NODE = textwrap.dedent("""
    import ctypes, os, socket, subprocess, sys, runpy
    name, copy, mnt, read_only = sys.argv[1:5]
    CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000  # this node's own mounts and hostname, as another machine's
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNS | CLONE_NEWUTS):
        raise OSError(ctypes.get_errno(), "unshare")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    socket.sethostname(name)
    subprocess.run(["mount", "--bind", copy, mnt], check=True)
    if read_only == "1":
        subprocess.run(["mount", "-o", "remount,bind,ro", mnt], check=True)
    sys.argv = [sys.argv[5]] + sys.argv[6:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def test_two_nodes_with_their_own_copies_of_the_data_start_and_copies_that_differ_are_named(tmp_path):
    """Two "nodes" (a mount and UTS namespace each: own hostname, own copy of the data mounted at the same path, one
    read-only; one cache folder shared, as a home directory on a cluster) and one rank each, started as srun starts
    them: the copies' times differ, their content does not, so the run starts; each node maps its own index; a
    second start lists nothing; a copy that lost a file stops both ranks with the same line naming it."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root (mount and UTS namespaces): run it through .ci/run")
    a = make_tree(tmp_path / "a", [f"c{k}/{i}.jpg" for k in range(4) for i in range(5)])
    b = copy_later(a, tmp_path / "b")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "node.py").write_text(NODE)
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)

    def start(name):
        port, procs = free_port(), []
        for rank, (host, copy, ro) in enumerate((("nodea", a, "0"), ("nodeb", b, "1"))):
            env = dict(os.environ, OMP_NUM_THREADS="1", MFF_DS_CACHE=str(tmp_path / "cache"), RANK=str(rank),
                       LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(forkserver.popen([sys.executable, str(tmp_path / "node.py"), host, str(copy), str(mnt), ro,
                                           str(tmp_path / "rank.py"), str(mnt), str(tmp_path / name)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out[-3000:]
        return [json.loads((tmp_path / f"{name}.{r}").read_text()) for r in range(2)]
    first = start("first")
    assert first[0]["n"] == first[1]["n"] == 20, first
    assert first[0]["path"] == str(mnt / idx.INDEX_NAME)  # node a's copy is writable: beside it
    assert first[1]["path"].endswith(".nodeb.index")  # node b's is read-only: its own file in the shared cache
    assert len(first[1]["reads"]) == 5  # node b listed its copy once
    second = start("second")
    assert [r["path"] for r in second] == [r["path"] for r in first]
    assert all(set(r["reads"]) == {str(mnt)} for r in second), second  # fresh on both nodes: no listing
    os.chmod(b / "c2", 0o755)
    os.remove(b / "c2" / "3.jpg")
    third = start("third")
    said = (f"data.path: the data under {str(mnt)!r} differs between nodes: nodea (rank 0) lists 20 files, nodeb "
            f"(rank 1) 19; the first difference is file 13 of the listing: 'c2/3.jpg' (label 2) on nodea (rank 0), "
            f"'c2/4.jpg' (label 2) on nodeb (rank 1); expected the same files and labels on every node (copies of "
            f"the data may differ in times and mount paths, not in what they hold)")
    assert [r.get("error") for r in third] == [said, said]


def test_fine_tuning_data_and_make_shards_read_the_index_they_are_given(tmp_path):
    """data.train_index / data.val_index reach the eval sources, and make_shards --index is what it converts: a list
    file naming 2 of a folder's 3 images gives 2 samples, not the 3 a listing would find."""
    from PIL import Image

    from mff_ds.data.make_shards import convert
    from mff_ds.eval import data as edata
    from mff_ds.eval.recipe import EvalData
    root = tmp_path / "data"
    for rel in ("a/1.png", "a/2.png", "b/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / rel)
    lst = tmp_path / "two.txt"
    lst.write_text("a/1.png 0\nb/3.png 1\n")
    d = EvalData(source="imagefolder", train_path=str(root), val_path=str(root), train_index=str(lst))
    assert len(edata.open_source(d, "train")) == 2 and len(edata.open_source(d, "val")) == 3
    info = convert(str(root), str(tmp_path / "shards"), 10, progress=False, index=str(lst))
    assert info["splits"]["train"]["num_samples"] == 2


def test_a_resume_that_leaves_out_data_index_keeps_the_list_and_other_data_is_said(tmp_path, capfd):
    """End to end (pretraining, 1 rank): a run trained on a list file naming 24 of the folder's 32 images, rerun
    without data.index, keeps the list (said) and trains on it (the checkpoint records what the data held: the same);
    rerun after files were added to the list, it says the data changed."""
    import yaml
    from PIL import Image

    from conftest import TINY_RECIPE
    from mff_ds.engine.recipe import leaf_keys, read_tree, validate
    from mff_ds.pretrain.recipe import Recipe
    from mff_ds.pretrain.task import train
    root = tmp_path / "data"
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(16):
            Image.new("RGB", (36, 36), (8 * i, 100 * k, 50)).save(root / f"c{k}" / f"{i:02d}.png")
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"c{k}/{i:02d}.png {k}\n" for k in range(2) for i in range(12)))
    tree = dict(TINY_RECIPE, data={"source": "imagefolder", "path": str(root), "num_workers": 0, "augment": "mae"},
                schedule={"epochs": 4, "warmup_epochs": 1})  # 24 images: one step of 16 per epoch
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(tree))
    out = tmp_path / "out"

    def start(*sets, steps):
        t, _, hand = read_tree(str(mine), list(sets))
        return train(validate(Recipe, t, 1, by_hand=hand), str(out), max_steps=steps)
    start(f"data.index={lst}", steps=1)
    marker = lambda step: json.loads((out / "checkpoints" / f"global_step{step}" / "mff_complete.json").read_text())
    assert marker(1)["data"]["files"] == 24 and marker(1)["compat"]["data"]["index"] == str(lst)
    capfd.readouterr()
    start(steps=2)
    err = capfd.readouterr().err
    assert f"kept: data.index: the run's {str(lst)!r}" in err and "on other data" not in err, err
    assert marker(2)["data"] == marker(1)["data"] and yaml.safe_load((out / "recipe.yaml").read_text())["data"][
        "index"] == str(lst)
    assert "data.index" not in leaf_keys(tree["data"])
    with lst.open("a") as f:
        f.write("c0/12.png 0\n")
    start(steps=3)
    assert "on other data: 24 files when it was written, 25 now" in capfd.readouterr().err
