"""Numerical equivalence with mmpretrain 1.2.0 on every fixture found: tiny64 and mae_tiny64 in
tests/fixtures/mmpretrain, `small` from ../shared/fixtures/mmpretrain when it is there.

Tolerances from the fixtures' README: loss abs < 1e-5; latent, pred, fusion weights rel < 1e-4;
every gradient (mapped to mmpretrain keys) rel < 1e-3; mask and ids_restore exact.
"""
import pytest
import torch

from conftest import fixture, fixture_names, require_fixtures
from mff_ds.convert import load_mmpretrain, to_mmpretrain


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_fixture(name, **overrides):
    io = torch.load(fixture(f"{name}_io.pth"), weights_only=True)
    model = load_mmpretrain(fixture(f"{name}_ckpt.pth"), **overrides)
    model.train()
    out = model(io["inputs"], noise=io["noise"])
    out.loss.backward()
    grads = to_mmpretrain({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return io, model, out, grads


def errors(io, out, grads):
    e = {"loss": abs(out.loss.item() - io["loss"].item()),
         "latent": rel(out.latent, io["latent"]), "pred": rel(out.pred, io["pred"])}
    if io["fusion_weights"] is not None:
        e["fusion_weights"] = rel(out.fusion_weights, io["fusion_weights"])
    e["grad"] = max(rel(grads[k] if grads.get(k) is not None else torch.zeros_like(g), g)
                    for k, g in io["grads"].items())
    return e


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_equivalence(name):
    io, model, out, grads = run_fixture(name)
    assert torch.equal(out.mask, io["mask"]) and torch.equal(out.ids_restore, io["ids_restore"])
    assert (out.fusion_weights is None) == (io["fusion_weights"] is None)
    missing = sorted(set(io["grads"]) - set(grads))
    assert not missing, f"parameters with a reference gradient that we do not train: {missing}"
    e = errors(io, out, grads)
    print(name, {k: f"{v:.2e}" for k, v in e.items()})
    assert e["loss"] < 1e-5
    assert e["latent"] < 1e-4 and e["pred"] < 1e-4 and e.get("fusion_weights", 0) < 1e-4
    assert e["grad"] < 1e-3
    # parameters mmpretrain keeps frozen are frozen here too
    frozen = {k for k, p in to_mmpretrain(dict(model.named_parameters())).items() if not p.requires_grad}
    assert frozen == set(io.get("params_without_grad", frozen))


def test_mae_fixture_is_plain_mae():
    require_fixtures("mae_tiny64")
    model = load_mmpretrain(fixture("mae_tiny64_ckpt.pth"))
    assert not model.is_mff and len(model.levels) == 1
    assert not any(n.startswith("fusion_") for n, _ in model.named_parameters())

