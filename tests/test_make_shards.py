"""make_shards: round trip ImageFolder -> shards -> samples, skipped files, atomic shards, resume."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mff_ds.data import make_shards, sources


@pytest.fixture()
def src(tmp_path):
    """ImageFolder with 2 classes, 11 JPEGs + 2 PNGs, one corrupt file and one non-image .txt (ignored)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for i in range(13):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
        b = io.BytesIO()
        im.save(b, "PNG" if i >= 11 else "JPEG")
        (d / f"img.{i:02d}.{'png' if i >= 11 else 'jpeg'}").write_bytes(b.getvalue())  # dots in names
    (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    (root / "class1" / "notes.txt").write_text("not an image")
    return root


def read_all(out):
    info = json.load(open(out / "_info.json"))["splits"]["train"]
    got = {}
    for s in info["shards"]:
        samples = list(sources.iter_shard(str(out / s["name"])))
        assert len(samples) == s["count"]
        for name, data, label in samples:
            fname = name.split("(")[1].rstrip(")")
            got[fname] = (data, label)
    return info, got


def test_round_trip(src, tmp_path):
    out = tmp_path / "out"
    make_shards.main([str(src), str(out), "--shard-size", "4", "--workers", "2"])
    info, got = read_all(out)
    assert [s["name"] for s in info["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert sum(s["count"] for s in info["shards"]) == 13  # 14 files, shuffled, 4 per shard, 1 skipped
    assert info["num_samples"] == 13 and info["classes"] == ["class0", "class1"]
    assert len(info["skipped"]) == 1 and info["skipped"][0].startswith(os.path.join("class1", "broken.jpg"))
    expected = {str(p.relative_to(src)): (p.read_bytes(), int(p.parent.name[-1]))
                for p in src.rglob("img.*")}
    assert got == expected  # same bytes, same labels, every file once
    assert sources.shard_counts(sources.expand_shards(str(out / info["pattern"])))[0] == \
        [s["count"] for s in info["shards"]]
    assert not [f for f in os.listdir(out) if "tmp" in f]


def test_interrupted_conversion_resumes(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = make_shards._write_shard, []

    def failing(job):
        calls.append(job[1])
        if len(calls) == 3:  # dies while writing the third shard
            with open(os.path.join(job[0], f".{job[1]}.tmp{os.getpid()}"), "wb") as f:
                f.write(b"half a tar")
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(make_shards, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        make_shards.convert(str(src), str(out), shard_size=4, progress=False)
    done = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    assert done == ["train-000000.tar", "train-000001.tar"] and not (out / "_info.json").exists()
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in done}

    calls.clear()
    monkeypatch.setattr(make_shards, "_write_shard", lambda job: calls.append(job[1]) or real(job))
    make_shards.convert(str(src), str(out), shard_size=4, progress=False)
    assert calls == ["train-000002.tar", "train-000003.tar"]  # only the missing shards
    assert {f: os.stat(out / f).st_mtime_ns for f in done} == mtimes
    assert not [f for f in os.listdir(out) if "tmp" in f]
    info, got = read_all(out)
    assert info["num_samples"] == 13 and len(got) == 13

    with pytest.raises(ValueError, match="other parameters"):
        make_shards.convert(str(src), str(out), shard_size=5, progress=False)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """A missing folder, or a list file naming files that are not there: one line, no traceback."""
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "1.jpg").write_bytes(b"x")
    lst = tmp_path / "list.txt"
    lst.write_text("a/1.jpg 0\na/2.jpg 0\n")
    for argv, said in (([str(tmp_path / "nowhere")], "is not a directory"),
                       ([str(tmp_path / "src"), "--index", str(lst)], "1 of the 2 files")):
        assert make_shards.main([*argv[:1], str(tmp_path / "out"), "--shard-size", "2", *argv[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("make_shards: ") and said in err[0], err
