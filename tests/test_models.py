"""Model construction, initialisation, API contract and input validation."""
import math

import pytest
import torch

from conftest import fixture, require_fixtures
from mff_ds.models import arch_names, build_model
from mff_ds.models.archs import default_out_indices
from mff_ds.models.vit import sincos_pos_embed

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2, out_indices=[0, 1, 3])


def test_reference_parameter_counts():
    # mmpretrain: MFF ViT-B pretraining model 114,860,806; MAE 111,907,840 (reference doc 1.9)
    assert sum(p.numel() for p in build_model("mff_vit_base_patch16").parameters()) == 114_860_806
    assert sum(p.numel() for p in build_model("mae_vit_base_patch16").parameters()) == 111_907_840


def test_named_archs_and_default_levels():
    assert default_out_indices(12) == [0, 2, 4, 6, 8, 11]
    assert len(arch_names()) == 20
    m = build_model("mff_vit_small_patch14", img_size=56, decoder_depth=1)
    assert (m.cfg.embed_dim, m.cfg.depth, m.cfg.num_heads, m.num_patches) == (384, 12, 6, 16)
    assert m.cfg.decoder_embed_dim == 512 and m.cfg.decoder_num_heads == 16
    mae = build_model("mae_vit_tiny_patch16", img_size=32, decoder_depth=1)
    assert mae.levels == [11] and not hasattr(mae, "fusion_logits") and not hasattr(mae, "fusion_proj")


def test_output_contract_and_noise_fixes_mask():
    m = build_model(TINY)
    x = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    out = m(x, noise=noise)
    keep = 4
    assert out.loss.dim() == 0 and out.pred.shape == (3, 16, 8 * 8 * 3)
    assert out.latent.shape == (3, 1 + keep, 48) and out.fusion_weights.shape == (3,)
    assert torch.allclose(out.fusion_weights.sum(), torch.tensor(1.0))
    assert torch.equal(out.mask.sum(1), torch.full((3,), 12.0))
    kept = torch.argsort(noise, 1)[:, :keep]  # smallest noise kept
    assert torch.equal(out.mask.gather(1, kept), torch.zeros(3, keep))
    assert torch.equal(out.ids_restore, torch.argsort(torch.argsort(noise, 1), 1))
    again = m(x, noise=noise)
    assert torch.equal(again.loss, out.loss)
    torch.manual_seed(1)
    assert not torch.equal(m(x).mask, out.mask)  # without noise it draws its own


def test_initialisation_follows_reference():
    m = build_model("mff_vit_base_patch16", decoder_depth=1)
    bound = math.sqrt(6 / (768 + 768))
    w = m.fusion_proj[0].weight
    assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 2e-3
    assert torch.equal(m.fusion_proj[0].bias, torch.zeros(768))
    assert torch.equal(m.fusion_logits, torch.ones(6)) and m.fusion_logits.requires_grad
    assert torch.allclose(m.fusion_weights(), torch.full((6,), 1 / 6))
    assert 0.5e-6 < m.blocks[0].mlp.fc1.bias.std().item() < 2e-6
    assert torch.equal(m.blocks[0].attn.qkv.bias, torch.zeros(2304))
    assert torch.equal(m.decoder_blocks[0].mlp.fc1.bias, torch.zeros(2048))
    assert abs(m.cls_token.std().item() - 0.02) < 0.005
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0, 0], torch.zeros(768))


def test_sincos_matches_mmpretrain_table():
    require_fixtures("small")
    sd = torch.load(fixture("small_ckpt.pth"), weights_only=True)["state_dict"]
    for key, dim in (("backbone.pos_embed", 192), ("neck.decoder_pos_embed", 128)):
        assert torch.allclose(sincos_pos_embed(dim, 14), sd[key], atol=1e-6)


def test_param_groups_decay_rule():
    m = build_model(TINY)
    names = {id(p): n for n, p in m.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in m.param_groups(0.05))
    assert "fusion_logits" in decay and "fusion_proj.0.weight" in decay and "blocks.0.attn.qkv.weight" in decay
    assert {"fusion_proj.0.bias", "cls_token", "mask_token", "norm.weight", "blocks.1.norm2.bias",
            "decoder_norm.weight"} <= no_decay
    assert "pos_embed" not in decay | no_decay  # fixed: not trained at all
    _, nd = m.param_groups(0.05, decay_fusion_logits=False)
    assert any(p is m.fusion_logits for p in nd["params"])


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = build_model(TINY)
    b = build_model({**TINY, "grad_checkpointing": True})
    b.load_state_dict(a.state_dict())
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    a(x, noise).loss.backward()
    b(x, noise).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=torch.randn(2, 3, 64, 64)), r"images: expected shape \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"),
    (dict(images=torch.randn(2, 1, 32, 32)), r"expected shape \(B, 3, 32, 32\), got \(2, 1, 32, 32\)"),
    (dict(images=torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15)), r"noise: expected shape .* \(2, 16\), got \(2, 15\)"),
])
def test_bad_inputs_name_expected_and_given(kwargs, match):
    m = build_model(TINY)
    with pytest.raises(ValueError, match=match):
        m(kwargs["images"], noise=kwargs.get("noise"))


@pytest.mark.parametrize("spec, match", [
    ("mff_vit_gigantic_patch16", "unknown architecture 'mff_vit_gigantic_patch16'; expected one of"),
    ({**TINY, "img_size": 30}, "model.img_size: expected a multiple of patch_size 8, got 30"),
    ({**TINY, "out_indices": [0, 9]}, r"model.out_indices: expected indices in \[-4, 3\] for depth 4, got \[9\]"),
    ({**TINY, "embed_dim": 50}, "model.embed_dim: expected a multiple of num_heads 3, got 50"),
    ({**TINY, "kernels": "cuda"}, "model.kernels: expected one of"),
    ({**TINY, "depth": "4"}, "model.depth: expected int, got '4'"),
    ({**TINY, "colour": 1}, "model.colour: unknown key; expected one of"),
])
def test_bad_configs_are_clear(spec, match):
    with pytest.raises(ValueError, match=match):
        build_model(spec)
