"""The model zoo (mff_ds.zoo): the table, verified downloads from a loopback HTTP server (files built from the
in-repo mmpretrain fixtures, named with their real SHA-256 prefixes), a corrupted download refused, two processes
fetching once, offline and mirror paths, and zoo names taken by evaluate, fine-tune and pretraining's init_from.
Nothing leaves the machine: the served entries point at 127.0.0.1 and any other connection fails the test."""
import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import sys
import threading
import time

import pytest
import torch
import yaml

import forkserver
from conftest import REPO, fixture, tiny_recipe
from mff_ds import convert, zoo
from mff_ds.common import MissingFileError, UserError
from mff_ds.convert.__main__ import main as convert_main
from mff_ds.zoo.__main__ import main as zoo_main, rows

# tests/fixtures/mmpretrain/README.md: tiny64 is an mmpretrain MFF (embed 64, 4 blocks, 2 heads, 64 px, patch 16)
TINY64 = {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 2, "decoder_embed_dim": 32,
          "decoder_depth": 1, "decoder_num_heads": 2, "out_indices": [0, 1, 3], "norm_pix_loss": True}


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; counts GETs per path; `corrupt` names files served with one byte flipped; `delay`
    holds each answer so that racing processes overlap."""
    gets, corrupt, delay = {}, set(), 0.0

    def do_GET(self):
        Handler.gets[self.path] = Handler.gets.get(self.path, 0) + 1
        time.sleep(Handler.delay)
        name = self.path.rsplit("/", 1)[-1]
        if name not in Handler.corrupt:
            return super().do_GET()
        data = bytearray(open(os.path.join(self.directory, name), "rb").read())
        data[len(data) // 2] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(bytes(data))

    def log_message(self, *args):
        pass


def _classifier_file(path):
    """A tiny fine-tuned classifier in mmpretrain's layout (as the released ones), 3 classes of 16 px images."""
    from mff_ds.eval import models as em
    torch.manual_seed(0)
    vit = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=4.0)
    sd = em.build_classifier("finetune", vit, 3).state_dict()
    mm = convert.to_mmpretrain({k: v for k, v in sd.items() if not k.startswith(("fc_norm", "head"))})
    mm.update({"backbone.ln2.weight": sd["fc_norm.weight"], "backbone.ln2.bias": sd["fc_norm.bias"],
               "head.fc.weight": sd["head.weight"], "head.fc.bias": sd["head.bias"]})
    torch.save({"meta": {}, "state_dict": mm}, path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The served folder, the loopback server and an MFF_DS_ZOO_EXTRA file of entries pointing at it."""
    root = tmp_path_factory.mktemp("served")
    src = fixture("tiny64_ckpt.pth")
    mff = root / f"tiny64_mff_20230801-{_sha256(src)[:8]}.pth"  # named as mmpretrain names its releases
    shutil.copy(src, mff)
    _classifier_file(root / "tiny_cls.pth")
    shutil.copy(mff, root / f"tiny64_bad_20230801-{_sha256(mff)[:8]}.pth")  # served corrupted
    off = root / f"tiny64_off_20230801-{_sha256(mff)[:8]}.pth"  # for the mirrors of an unreachable URL
    shutil.copy(mff, off)
    Handler.corrupt = {f"tiny64_bad_20230801-{_sha256(mff)[:8]}.pth"}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    with socket.socket() as s:  # a port nobody listens on: "offline"
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    entries = [
        dict(name="t_mff", url=f"{base}/{mff.name}", sha256=mff.name[-12:-4], kind="pretrained encoder+decoder",
             arch="mff_vit_tiny_patch16", params=0.2, result="none", recipe="tiny64 fixture"),
        dict(name="t_cls", url=f"{base}/tiny_cls.pth", kind="classifier", arch="mae_vit_tiny_patch16"),
        dict(name="t_bad", url=f"{base}/{sorted(Handler.corrupt)[0]}", sha256=mff.name[-12:-4], kind="classifier",
             arch="x"),
        dict(name="t_off", url=f"http://127.0.0.1:{dead}/far/{off.name}", sha256=mff.name[-12:-4],
             kind="pretrained encoder+decoder", arch="x"),
    ]
    extra = root / "extra.yaml"
    extra.write_text(yaml.safe_dump(entries))
    yield {"root": root, "base": base, "extra": str(extra), "mff": mff}
    httpd.shutdown()


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    """A fresh cache, the test entries, no mirror; a connection to anything but loopback fails the test."""
    monkeypatch.setenv("MFF_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MFF_DS_ZOO_EXTRA", server["extra"])
    monkeypatch.delenv("MFF_DS_ZOO_MIRROR", raising=False)
    real = socket.getaddrinfo

    def loopback_only(host, *a, **kw):
        assert host in ("127.0.0.1", "localhost"), f"the tests must not reach {host}"
        return real(host, *a, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    Handler.gets.clear()
    return dict(os.environ, OMP_NUM_THREADS="1")


def _gets(name) -> int:
    return sum(n for path, n in Handler.gets.items() if path.endswith(name))


# ------------------------------------------------------------------ the table
def test_table_has_the_released_files_with_their_published_hashes_and_results(capsys):
    table = zoo.entries()
    assert {"mff_vit-b_300e", "mff_vit-b_800e", "mff_vit-b_300e_ft", "mff_vit-b_800e_ft", "mff_vit-b_800e_lin"} <= set(table)
    for size in ("b", "l", "h"):
        assert {f"mae_vit-{size}", f"mae_vit-{size}_ft", f"mae_vit-{size}_vis"} <= set(table)
    files = [e.filename for e in table.values()]
    assert len(set(files)) == len(files)  # one cache folder, one file name each
    for e in table.values():
        if "openmmlab" in e.url:  # the hash prefix is the one the released file name carries
            assert e.sha256 and e.filename.endswith(f"-{e.sha256}.pth"), e.name
        else:  # official MAE publishes none: recorded on first download
            assert e.sha256 is None and e.url.startswith("https://dl.fbaipublicfiles.com/mae/"), e.name
    assert [table[n].result for n in ("mff_vit-b_300e_ft", "mff_vit-b_800e_ft", "mff_vit-b_800e_lin")] == \
        ["83.0 top-1", "83.7 top-1", "68.3 top-1"]
    assert zoo_main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(table)
    for line, e in zip(lines, table.values()):
        assert e.result in line and e.filename in line and line.endswith(" no")


def test_list_shows_extra_entries_and_whether_they_are_cached(env):
    p = forkserver.run([sys.executable, "-m", "mff_ds.zoo", "fetch", "t_mff"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = forkserver.run([sys.executable, "-m", "mff_ds.zoo", "list"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines()}
    assert rows["t_mff"].endswith(" yes") and rows["t_cls"].endswith(" no") and rows["mff_vit-b_300e"].endswith(" no")
    assert "recorded on first download" in rows["t_cls"]


# ------------------------------------------------------------------ fetch
def test_fetch_verifies_caches_and_rechecks_on_every_use(env, server, capsys):
    path = zoo.fetch("t_mff", progress=False)
    assert path.parent == zoo.zoo_dir() and _sha256(path) == _sha256(server["mff"])
    assert zoo.fetch("t_mff") == path and _gets(server["mff"].name) == 1  # cached: no second download
    assert zoo.resolve("t_mff") == str(path) and zoo.resolve(str(server["mff"])) == str(server["mff"])
    # no published hash: recorded on first download (trust on first use), then checked
    cls = zoo.fetch("t_cls", progress=False)
    assert "no SHA-256 is published" in capsys.readouterr().err
    assert (cls.parent / "tiny_cls.pth.sha256").read_text().strip() == _sha256(server["root"] / "tiny_cls.pth")
    row = next(r for r in rows() if r["name"] == "t_cls")
    assert (row["sha256"], row["cached"]) == (_sha256(cls)[:8] + " (recorded)", "yes")
    with open(cls, "r+b") as f:  # damaged in the cache
        f.seek(100)
        f.write(b"\0\1\2")
    with pytest.raises(UserError, match="changed since it was verified: SHA-256 expected [0-9a-f]{64}, got"):
        zoo.fetch("t_cls")
    assert not cls.exists()
    assert _sha256(zoo.fetch("t_cls", progress=False)) == _sha256(server["root"] / "tiny_cls.pth")
    assert _gets("tiny_cls.pth") == 2


def test_a_corrupted_download_is_refused_and_removed(env, server):
    with pytest.raises(UserError) as e:
        zoo.fetch("t_bad", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and zoo.get("t_bad").url in msg
    assert f'expected "{zoo.get("t_bad").sha256}"' in msg and "got" in msg
    assert os.listdir(zoo.zoo_dir()) == [zoo.get("t_bad").filename + ".lock"]  # no file, no partial file


def test_two_processes_fetch_once(env, server):
    Handler.delay = 1.0  # the first download is still running when the second process asks
    code = "from mff_ds import zoo; print(zoo.fetch('t_mff', progress=False))"
    try:
        procs = [forkserver.popen([sys.executable, "-c", code], env=env, stdout=-1, stderr=-1, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        Handler.delay = 0.0
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and _gets(server["mff"].name) == 1


def test_offline_names_the_url_and_the_path_and_a_mirror_serves(env, server, tmp_path, monkeypatch):
    e = zoo.get("t_off")
    with pytest.raises(MissingFileError) as err:
        zoo.fetch("t_off", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and e.url in msg and str(zoo.zoo_dir() / e.filename) in msg and "MFF_DS_ZOO_MIRROR" in msg
    mirror = tmp_path / "mirror"  # a shared folder of the same file names
    mirror.mkdir()
    shutil.copy(server["mff"], mirror / e.filename)
    monkeypatch.setenv("MFF_DS_ZOO_MIRROR", str(mirror))
    assert _sha256(zoo.fetch("t_off", progress=False)) == _sha256(server["mff"])
    os.remove(zoo.zoo_dir() / e.filename)
    monkeypatch.setenv("MFF_DS_ZOO_MIRROR", server["base"])  # an internal HTTP mirror
    assert _sha256(zoo.fetch("t_off", progress=False)) == _sha256(server["mff"]) and _gets(e.filename) == 1
    # the file put at the named path by hand is checked and used
    monkeypatch.delenv("MFF_DS_ZOO_MIRROR")
    assert zoo.fetch("t_off") == zoo.zoo_dir() / e.filename


def test_unknown_names_and_bad_entries_are_one_clear_line(env, tmp_path, monkeypatch):
    with pytest.raises(MissingFileError, match=r"mff_vit-b_300: expected an existing file or a zoo name, got "
                                               r"neither \(closest zoo names: mff_vit-b_300e"):
        zoo.resolve("mff_vit-b_300")
    with pytest.raises(ValueError, match="python -m mff_ds.zoo list"):
        zoo.check_source("no/such/file.pth")
    assert zoo.check_source("mff_vit-b_800e") == "mff_vit-b_800e" and zoo.as_given("mff_vit-b_800e") == "mff_vit-b_800e"
    assert zoo.as_given("some.pth") == os.path.abspath("some.pth")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"name": "x", "url": "http://127.0.0.1/x.pth", "kind": "model", "arch": "a",
                                    "sha256": "XYZ"}]))
    monkeypatch.setenv("MFF_DS_ZOO_EXTRA", str(bad))
    with pytest.raises(UserError, match="zoo entry 'x': kind: .*sha256: expected lowercase hex digits"):
        zoo.entries()


# ------------------------------------------------------------------ zoo names where checkpoints are taken
def test_evaluate_and_convert_take_a_zoo_name(env, server, tmp_path):
    from test_eval import _imagefolder
    from mff_ds.eval.train import evaluate_checkpoint
    val = _imagefolder(tmp_path / "val", per_class=4)
    want = evaluate_checkpoint(str(server["root"] / "tiny_cls.pth"), val, crop_pct=1.0, num_workers=0)
    p = forkserver.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "t_cls", "--val", val, "--crop-pct",
                        "1", "--num-workers", "0", "--output-dir", str(tmp_path / "ev")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(open(tmp_path / "ev" / "metrics.jsonl").readline())
    assert (got["top1"], got["top5"], got["checkpoint"]) == (want["top1"], want["top5"], "t_cls")
    assert convert_main(["to-timm", "t_mff", str(tmp_path / "enc.safetensors")]) == 0  # detected: mmpretrain
    enc, _ = convert.read_file(tmp_path / "enc.safetensors")
    ref = convert.from_mmpretrain(torch.load(server["mff"], weights_only=True)["state_dict"])
    assert torch.equal(enc["blocks.3.mlp.fc2.weight"], ref["blocks.3.mlp.fc2.weight"])


def test_finetune_starts_from_a_zoo_name(env, server, tmp_path):
    from test_eval import _recipe
    from mff_ds.eval import models as em
    from mff_ds.eval.train import run
    sd, cfg = em.load_encoder("t_mff", model={"num_heads": 2})
    ref, _ = em.load_encoder(str(server["mff"]), model={"num_heads": 2})
    assert cfg.embed_dim == 64 and all(torch.equal(sd[k], ref[k]) for k in ref)
    r = _recipe(tmp_path, "finetune", init={"checkpoint": "t_mff"}, data={"img_size": 16},
                schedule={"epochs": 1, "warmup_epochs": 0})
    s = run(r, str(tmp_path / "ft"), max_steps=1)
    assert s["step"] == 1 and yaml.safe_load(open(tmp_path / "ft" / "recipe.yaml"))["init"]["checkpoint"] == "t_mff"


def test_pretraining_init_from_a_zoo_name_and_not_on_resume(env, server, tmp_path):
    from mff_ds.pretrain.recipe import load_recipe
    from mff_ds.pretrain.task import train
    text = tiny_recipe(model=dict(TINY64, arch="mff_vit_tiny_patch16"), init_from="t_mff",
                       schedule={"epochs": 1, "warmup_epochs": 1, "warmup_start_factor": 1e-9})
    (tmp_path / "r.yaml").write_text(text)
    out = str(tmp_path / "pt")
    train(load_recipe(str(tmp_path / "r.yaml"), world_size=1), out, max_steps=1)
    state = torch.load(os.path.join(out, "checkpoints", "global_step1", "mp_rank_00_model_states.pt"),
                       map_location="cpu", weights_only=False)["module"]
    ref = convert.from_mmpretrain(torch.load(server["mff"], weights_only=True)["state_dict"])
    for k in ("blocks.0.attn.qkv.weight", "fusion_logits", "decoder_pred.weight"):  # lr ~1e-14 in step 1
        torch.testing.assert_close(state[k].float(), ref[k].float(), atol=1e-6, rtol=0)
    assert yaml.safe_load(open(os.path.join(out, "recipe.yaml")))["init_from"] == "t_mff"
    # a resumed run ignores init_from: this one cannot be fetched (nothing listens), and is not asked for
    (tmp_path / "r.yaml").write_text(text.replace("init_from: t_mff", "init_from: t_off"))
    s = train(load_recipe(str(tmp_path / "r.yaml"), world_size=1), out, max_steps=2)
    assert s["step"] == 2 and not zoo.is_cached(zoo.get("t_off"))


def test_init_from_refuses_another_architecture(env):
    from mff_ds.models import build_model
    from mff_ds.pretrain.task import load_init
    with pytest.raises(UserError, match=r"init_from t_mff does not match the model architecture:\n  shape mismatch"):
        load_init(build_model(dict(TINY64, embed_dim=32, decoder_embed_dim=32)), "t_mff")
