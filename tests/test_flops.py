"""The analytic FLOP count agrees with torch's FlopCounterMode on a real forward+backward."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mff_ds.models import build_model
from mff_ds.models.flops import flops_per_image


@pytest.mark.parametrize("spec", [
    dict(img_size=64, patch_size=16, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64, decoder_depth=2,
         decoder_num_heads=2, out_indices=[0, 2, 3]),
    dict(img_size=64, patch_size=16, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64, decoder_depth=2,
         decoder_num_heads=2, out_indices=[3]),
])
def test_flops_match_counter(spec):
    model = build_model(spec, kernels="torch")
    x = torch.randn(4, 3, 64, 64)
    with FlopCounterMode(display=False) as fc:
        model(x).loss.backward()
    counted = fc.get_total_flops() / 4
    analytic = flops_per_image(model.cfg)
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted)


def test_mff_costs_little_over_mae():
    mff = flops_per_image(build_model("mff_vit_base_patch16").cfg)
    mae = flops_per_image(build_model("mae_vit_base_patch16").cfg)
    assert 1.0 < mff / mae < 1.05
