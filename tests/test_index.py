"""The dataset index (mff_ds/data/index.py): the listing it keeps is the one the ImageFolder scan made, a fresh index
costs one read of the root directory, a stale or damaged one is rebuilt and said, list files are read, and in a
2-rank start exactly one process lists the tree. Directory reads are counted with Python's audit events
(os.scandir / os.listdir; os.walk goes through os.scandir), not timed."""
import json
import os
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


def test_unlabelled_files_under_the_root_get_label_minus_one_and_an_index_in_the_cache(tmp_path, cache):
    root = make_tree(tmp_path / "flat", ["b.jpg", "a.PNG", "notes.txt", ".hidden/x.jpg"])
    path, _ = idx.ensure(str(root), progress=False)
    assert Path(path).parent == cache / "index"  # the root's own mtime is the fingerprint: nothing written there
    index = idx.Index.open(path)
    assert listing(index, str(root)) == scan_reference(str(root))[0] and index.classes is None


def test_a_fresh_index_costs_one_read_of_the_root_and_no_listing(tmp_path, capfd):
    root = make_tree(tmp_path / "data", [f"c{k}/{i}.jpg" for k in range(5) for i in range(3)])
    (path, digest), dirs = reads(idx.ensure, str(root), progress=False)
    assert len(dirs) == 6 and path == str(root / idx.INDEX_NAME)  # the root + 5 class folders, once
    assert capfd.readouterr().err == ""  # a first listing this short goes unsaid
    (again, digest2), dirs = reads(idx.ensure, str(root), progress=False)
    assert (again, digest2) == (path, digest) and dirs == [str(root)]
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("change, said", [("add", "1 changed (e.g. c1)"), ("remove", "1 changed (e.g. c0)"),
                                          ("new class", "1 added (e.g. c9)"), ("drop class", "1 removed (e.g. c2)")])
def test_a_stale_index_is_found_from_the_folders_rebuilt_and_said(tmp_path, capfd, change, said):
    root = make_tree(tmp_path / "data", [f"c{k}/{i}.jpg" for k in range(3) for i in range(3)])
    idx.ensure(str(root), progress=False)
    before = os.stat(root / "c1").st_mtime_ns
    if change == "add":
        (root / "c1" / "new.jpg").write_bytes(b"x")
        os.utime(root / "c1", ns=(before + 10**9, before + 10**9))  # coarse-mtime filesystems
    elif change == "remove":
        os.remove(root / "c0" / "0.jpg")
        os.utime(root / "c0", ns=(before + 10**9, before + 10**9))
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
    header = idx.write(path, "/r", "imagefolder", [["a", 1]], ["a", "b", "c"], names, [0, 1, 1, 2])
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


def test_a_list_file_is_an_index_without_listing(tmp_path, capfd):
    root = tmp_path / "data"
    root.mkdir()
    lst = tmp_path / "train.txt"
    lst.write_text("n01/a b.JPEG 3\n\nval_0001.JPEG 0\nunlabelled.jpg\n")
    (path, _), dirs = reads(idx.ensure, str(root), str(lst), progress=False)
    assert dirs == []  # nothing listed: the list file is the listing
    index = idx.Index.open(path)
    assert [index.name(i) for i in range(3)] == ["n01/a b.JPEG", "val_0001.JPEG", "unlabelled.jpg"]
    assert index.labels.tolist() == [3, 0, -1] and index.classes is None
    lst.write_text("n01/a.JPEG three\n")
    with pytest.raises(UserError, match=r"train.txt:1: expected `relative/path label`, got 'n01/a.JPEG three'"):
        idx.ensure(str(root), str(lst), progress=False)


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


def test_a_node_that_does_not_see_rank_0s_index_builds_the_same_one_where_rank_0_said(tmp_path):
    """open_index's per-node builder: a node-local cache lacks the file rank 0 named; its first rank builds it at that
    path (target=), and it is the index rank 0 agreed on (same digest), so every rank of that node maps it."""
    root = make_tree(tmp_path / "data", ["a/1.jpg", "b/2.jpg", "b/3.jpg"])
    path, digest = idx.ensure(str(root), progress=False)
    elsewhere = str(tmp_path / "node1" / "cache.index")  # what rank 0 named, missing on this node
    assert not idx._is(elsewhere, digest)
    built, again = idx.ensure(str(root), target=elsewhere, force=True, progress=False)
    assert built == elsewhere and again == digest and idx._is(elsewhere, digest)
    assert listing(idx.Index.open(elsewhere, digest), str(root)) == listing(idx.Index.open(path), str(root))
    (tmp_path / "mnt").symlink_to(root)  # a node that mounts the data at another path lists the same index
    mounted_elsewhere = idx.ensure(str(tmp_path / "mnt"), target=str(tmp_path / "node2.index"), force=True,
                                   progress=False)
    assert mounted_elsewhere[1] == digest


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
