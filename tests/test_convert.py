"""Checkpoint interop: mmpretrain round trip, timm strict load + equal features, official MAE, CLI."""
import sys

import pytest
import timm
import torch

import forkserver
from conftest import REPO, fixture, require_fixtures
from mff_ds import convert
from mff_ds.convert.__main__ import main as convert_main
from mff_ds.models import build_model

SMALL = dict(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=32,
             decoder_depth=1, decoder_num_heads=2)  # vit_tiny encoder: 192/12/3


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mmpretrain_keys_and_layouts_match_fixture():
    require_fixtures("small")
    ck = torch.load(fixture("small_ckpt.pth"), weights_only=True)
    model = convert.load_mmpretrain(fixture("small_ckpt.pth"))
    mm = convert.to_mmpretrain(model.state_dict())
    assert mm.keys() == ck["state_dict"].keys()
    assert all(torch.equal(mm[k], v) for k, v in ck["state_dict"].items())
    assert mm["backbone.proj_weights"].shape == (6, 1, 1, 1)
    assert model.cfg.out_indices == [0, 2, 4, 6, 8, 11] and model.cfg.num_heads == 3
    assert model.cfg.decoder_num_heads == 4


def test_round_trip_is_lossless(tmp_path):
    model = perturbed(build_model("mff_vit_tiny_patch16", img_size=32, decoder_depth=1))
    path = tmp_path / "mm.pth"
    torch.save(convert.mmpretrain_checkpoint(model), path)
    back = convert.load_mmpretrain(path)  # the config text we write makes the round trip exact
    assert same_state(model, back)
    assert convert.from_mmpretrain(convert.to_mmpretrain(model.state_dict())).keys() == model.state_dict().keys()


def test_overrides_win_and_defaults_warn(tmp_path):
    require_fixtures("tiny64")
    ck = torch.load(fixture("tiny64_ckpt.pth"), weights_only=True)
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": ck["state_dict"]}, bare)
    with pytest.warns(UserWarning, match="standard defaults"):
        m = convert.load_mmpretrain(bare, out_indices=[0, 1, 3])
    assert m.cfg.num_heads == 1 and m.cfg.out_indices == [0, 1, 3]  # 64 // 64 heads by default
    m = convert.load_mmpretrain(fixture("tiny64_ckpt.pth"), mask_ratio=0.5)
    assert m.cfg.mask_ratio == 0.5 and m.cfg.len_keep == 8


def test_wrong_architecture_is_named(tmp_path):
    require_fixtures("tiny64")
    with pytest.raises(ValueError, match=r"does not match the model architecture:\n  shape mismatch: cls_token: expected \(1, 1, 128\), got \(1, 1, 64\)"):
        convert.load_mmpretrain(fixture("tiny64_ckpt.pth"), embed_dim=128, num_heads=2)
    with pytest.raises(ValueError, match="3 fusion level"):
        convert.load_mmpretrain(fixture("tiny64_ckpt.pth"), out_indices=[3])
    bogus = tmp_path / "bogus.pth"
    torch.save({"state_dict": {"backbone.foo": torch.zeros(1)}}, bogus)
    with pytest.raises(ValueError, match="no mff_ds counterpart for key 'backbone.foo'"):
        convert.load_mmpretrain(bogus)


def test_to_timm_loads_strictly_and_features_match():
    model = perturbed(build_model({**SMALL, "out_indices": [0, 5, 11]})).eval()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="token", img_size=32)
    vit.load_state_dict(convert.to_timm(model), strict=True)
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), model.forward_features(x), atol=1e-5)
    assert convert.timm_name(model.cfg) == "vit_tiny_patch16_224"


def test_official_mae_layouts(tmp_path):
    model = perturbed(build_model({**SMALL, "out_indices": [11], "decoder_num_heads": 2}))
    full, enc = tmp_path / "full.pth", tmp_path / "enc.pth"
    torch.save(convert.to_mae(model), full)
    torch.save(convert.to_mae(model, full=False), enc)
    back = convert.load_mae(full, num_heads=3, decoder_num_heads=2)
    assert same_state(model, back)
    with pytest.warns(UserWarning, match="encoder-only"):
        enc_model = convert.load_mae(enc, num_heads=3, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    assert torch.equal(enc_model.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    assert "decoder_embed.weight" not in convert.to_mae(model, full=False)["model"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_cli_chain(tmp_path, suffix):
    require_fixtures("tiny64")
    ours = tmp_path / f"ours{suffix}"
    run = lambda *a: convert_main([str(x) for x in a])
    forkserver.run([sys.executable, "-m", "mff_ds.convert", "from-mmpretrain", fixture("tiny64_ckpt.pth"), ours],
                   cwd=REPO, check=True, capture_output=True)
    ref = convert.load_mmpretrain(fixture("tiny64_ckpt.pth"))
    assert same_state(convert.load_model(ours), ref)
    for cmd in ("to-timm", "to-mae", "to-mmpretrain"):
        out = tmp_path / f"{cmd}{suffix}"
        run(cmd, ours, out)
        assert out.exists() and not list(tmp_path.glob(".*.tmp"))
    # the mmpretrain file carries an mmengine-style cfg (safetensors: in its metadata), so it reloads exactly
    back = convert.load_mmpretrain(tmp_path / f"to-mmpretrain{suffix}")
    assert same_state(back, ref) and back.cfg == ref.cfg  # heads etc. come from the cfg, not from defaults


def test_load_model_rejects_foreign_files(tmp_path):
    p = tmp_path / "x.pth"
    torch.save({"model": {}}, p)
    with pytest.raises(ValueError, match="expected an mff_ds model file"):
        convert.load_model(p)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        convert.load_model(tmp_path / "nope.pth")
