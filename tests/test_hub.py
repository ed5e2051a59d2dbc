"""Folders other libraries load: timm `local-dir:` (and Hub) folders, transformers ViTMAE folders, both ways.
Offline: conftest sets HF_HUB_OFFLINE, so any Hub lookup would fail instead of downloading."""
import json
import sys
from types import SimpleNamespace

import pytest
import timm
import torch

import forkserver
from conftest import REPO
from mff_ds import convert, hub
from mff_ds.convert.__main__ import main as convert_main
from mff_ds.pretrain.export import export
from mff_ds.models import build_model
from test_convert import perturbed, same_state

# ViT-S (384 wide, 6 heads) at full depth and ViT-B (768, 12 heads) cut to 2 blocks, both at small images:
# the first takes timm's own vit_small_patch16_224 name, the second the generic builder with every size in model_args
TIMM_SIZES = {
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6, img_size=32, out_indices=[0, 5, 11]),
    "vit_b_2blocks": dict(embed_dim=768, depth=2, num_heads=12, img_size=48, out_indices=[1]),
}
DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2)
# two MAE sizes for transformers: ViT-Ti and ViT-S widths at 3 blocks, patch 16 and 8, with and without norm-pix
HF_SIZES = {
    "tiny_p16": dict(embed_dim=192, depth=3, num_heads=3, img_size=64, patch_size=16, norm_pix_loss=True),
    "small_p8": dict(embed_dim=384, depth=3, num_heads=6, img_size=40, patch_size=8, norm_pix_loss=False),
}


def mae(spec, **kw):
    return perturbed(build_model({**DECODER, "out_indices": [spec["depth"] - 1], **spec, **kw})).eval()


@pytest.mark.parametrize("size", TIMM_SIZES)
def test_timm_local_dir_loads_with_no_other_argument(tmp_path, size):
    model = perturbed(build_model({**DECODER, **TIMM_SIZES[size]})).eval()
    hub.to_timm_dir(model, model.cfg, tmp_path / "enc")
    vit = timm.create_model(f"local-dir:{tmp_path / 'enc'}", pretrained=True).eval()
    x = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    with torch.no_grad():
        diff = (vit.forward_features(x) - model.forward_features(x)).abs().max().item()
    print(f"timm local-dir {size}: max |forward_features - ours| = {diff:.3g}")
    assert diff <= 1e-6, f"timm local-dir forward_features differ from ours by {diff}"
    assert vit.num_classes == 0 and vit.global_pool == "token"
    pc = vit.pretrained_cfg  # from our recipes: image size, the pretraining normalisation, the fine-tune crop
    assert tuple(pc["input_size"]) == (3, model.cfg.img_size, model.cfg.img_size)
    assert tuple(pc["mean"]) == (0.485, 0.456, 0.406) and tuple(pc["std"]) == (0.229, 0.224, 0.225)
    assert (pc["crop_pct"], pc["interpolation"]) == (0.875, "bicubic")
    assert "tag" not in pc and "license" not in pc  # nothing borrowed from timm's ImageNet weights
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_timm_name_is_used_when_registered(tmp_path):
    model = build_model({**DECODER, **TIMM_SIZES["vit_s"]})
    hub.to_timm_dir(model, model.cfg, tmp_path / "enc", crop_pct=0.9, interpolation="bilinear")
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch16_224" and cfg["model_args"]["img_size"] == [32, 32]
    assert (cfg["pretrained_cfg"]["crop_pct"], cfg["pretrained_cfg"]["interpolation"]) == (0.9, "bilinear")


@pytest.mark.parametrize("size", HF_SIZES)
def test_transformers_vitmae_gives_our_loss_and_latent(tmp_path, size):
    transformers = pytest.importorskip("transformers", reason="the optional extra mff-ds[hf]; make test installs it")
    model = mae(HF_SIZES[size])
    hub.to_hf(model, tmp_path / "hf")
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    enc = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, model.cfg.img_size, model.cfg.img_size, generator=g)
    noise = torch.rand(3, model.num_patches, generator=g)
    with torch.no_grad():
        ours, theirs, latent = model(x, noise), hf.eval()(pixel_values=x, noise=noise), enc(pixel_values=x, noise=noise)
    assert torch.equal(ours.mask, theirs.mask) and torch.equal(ours.ids_restore, theirs.ids_restore)
    loss_diff = abs(ours.loss.item() - theirs.loss.item())
    latent_diff = (ours.latent - latent.last_hidden_state).abs().max().item()
    print(f"transformers {size}: |loss - ours| = {loss_diff:.3g}, max |last_hidden_state - latent| = {latent_diff:.3g}")
    assert loss_diff <= 1e-5, f"ViTMAEForPreTraining loss differs from ours by {loss_diff}"
    assert (ours.pred - theirs.logits).abs().max().item() <= 1e-5
    assert latent_diff <= 1e-5, f"ViTMAEModel last_hidden_state differs from our latent by {latent_diff}"


@pytest.mark.parametrize("kind", ["mff", "mae"])
def test_to_hf_from_hf_is_bit_exact(tmp_path, kind):
    pytest.importorskip("transformers", reason="the optional extra mff-ds[hf]; make test installs it")
    spec = {**HF_SIZES["tiny_p16"], "out_indices": [0, 1, 2] if kind == "mff" else [2], "mask_ratio": 0.5}
    model = perturbed(build_model({**DECODER, **spec}))
    hub.to_hf(model, tmp_path / "hf")
    back = hub.from_hf(tmp_path / "hf")
    assert same_state(model, back) and back.cfg == model.cfg
    assert (tmp_path / "hf" / hub.FUSION).exists() == (kind == "mff")


def test_folders_saved_by_transformers_read_back(tmp_path):
    """A model fine-tuned in transformers comes back: save_pretrained's own key names (transformers 5 names the
    decoder blocks decoder.decoder_encoder.layer.N), and a ViTMAEModel folder (encoder only)."""
    transformers = pytest.importorskip("transformers", reason="the optional extra mff-ds[hf]; make test installs it")
    model = mae(HF_SIZES["small_p8"])
    hub.to_hf(model, tmp_path / "hf")
    transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    assert same_state(hub.from_hf(tmp_path / "resaved"), model)
    transformers.ViTMAEModel.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "encoder")
    with pytest.warns(UserWarning, match="encoder-only ViTMAE folder"):
        enc = hub.from_hf(tmp_path / "encoder")
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in convert.to_timm(model).items())


def test_mff_folder_is_a_working_vitmae_encoder(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the optional extra mff-ds[hf]; make test installs it")
    model = perturbed(build_model({**DECODER, **HF_SIZES["tiny_p16"], "out_indices": [0, 2]})).eval()
    hub.to_hf(model, tmp_path / "hf")
    # no masking and the identity order: ViTMAEModel is then the plain ViT, i.e. our forward_features
    enc = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf", mask_ratio=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    order = torch.arange(model.num_patches, dtype=torch.float32).expand(2, -1)
    with torch.no_grad():
        diff = (enc(pixel_values=x, noise=order).last_hidden_state - model.forward_features(x)).abs().max().item()
    print(f"transformers ViTMAEModel on an MFF folder, unmasked: max |last_hidden_state - forward_features| = {diff:.3g}")
    assert diff <= 1e-5
    # the same folder rewritten with a plain MAE loses its stale fusion file
    hub.to_hf(mae(HF_SIZES["tiny_p16"]), tmp_path / "hf")
    assert not (tmp_path / "hf" / hub.FUSION).exists() and hub.from_hf(tmp_path / "hf").cfg.out_indices == [2]


def test_bad_folders_give_one_clear_line(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the optional extra mff-ds[hf]; make test installs it")
    model = mae(HF_SIZES["tiny_p16"])
    hub.to_timm_dir(model, model.cfg, tmp_path / "timm")
    with pytest.raises(ValueError, match=r"expected a transformers ViTMAE folder .* got a timm folder \(architecture 'vit_base"):
        hub.from_hf(tmp_path / "timm")
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 192}))
    (vit / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="with model_type 'vit_mae' in config.json, got model_type 'vit'"):
        hub.from_hf(vit)
    hub.to_hf(model, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="but model.safetensors is missing"):
        hub.from_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match="expected a folder to write into .*, got a file"):
        hub.to_hf(model, tmp_path / "hf" / "config.json")
    run = lambda folder: convert_main(["from-hf", str(folder), str(tmp_path / "o.pth")])
    for folder, want in ((tmp_path / "hf", "model.safetensors is missing"), (tmp_path / "nope", "got no such folder")):
        assert run(folder) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: from-hf: ") and want in err, err
    # and from a shell: one line on stderr, no traceback
    p = forkserver.run([sys.executable, "-m", "mff_ds.convert", "from-hf", str(tmp_path / "timm"), str(tmp_path / "o.pth")],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: from-hf: ") and "got a timm folder" in p.stderr


def test_cli_folders(tmp_path):
    pytest.importorskip("transformers", reason="the optional extra mff-ds[hf]; make test installs it")
    model = perturbed(build_model({**DECODER, **HF_SIZES["tiny_p16"], "out_indices": [0, 2]}))
    convert.save_model(model, tmp_path / "m.safetensors")
    run = lambda *a: convert_main([str(v) for v in a])
    assert run("to-timm-dir", tmp_path / "m.safetensors", tmp_path / "timm") == 0
    assert run("to-hf", tmp_path / "m.safetensors", tmp_path / "hf") == 0
    assert run("from-hf", tmp_path / "hf", tmp_path / "back.pth") == 0
    assert same_state(convert.load_model(tmp_path / "back.pth"), model)
    vit = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in convert.to_timm(model).items())


def test_end_of_run_export_writes_the_timm_folder(tmp_path):
    model = perturbed(build_model({**DECODER, **TIMM_SIZES["vit_b_2blocks"]}))
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0, bfloat16_enabled=lambda: False)
    paths = export(engine, str(tmp_path / "ckpt"), "global_step1", str(tmp_path), {"step": 1})
    assert paths[-1] == str(tmp_path / "encoder_timm")
    vit = timm.create_model(f"local-dir:{paths[-1]}", pretrained=True)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in convert.to_timm(model).items())
