"""The whole MFF/MAE model with `kernels: triton` equals `kernels: torch` (and mmpretrain) on the fixtures.

On CPU the Triton kernels need TRITON_INTERPRET=1 from process start: tests/test_kernels.py runs this file in
such a child process (or run it yourself: TRITON_INTERPRET=1 pytest tests/test_kernels_model.py).
"""
import os

import pytest
import torch

from conftest import fixture, require_fixtures
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not CUDA and not INTERPRET, reason="on CPU this runs in the TRITON_INTERPRET=1 "
                                "child process of tests/test_kernels.py::test_interpreter_run")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(name, kernels):
    from mff_ds.convert import load_mmpretrain
    io = torch.load(fixture(f"{name}_io.pth"), weights_only=True)
    dev = "cuda" if CUDA else "cpu"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    model = load_mmpretrain(fixture(f"{name}_ckpt.pth"), kernels=kernels).train().to(dev)
    assert model.cfg.kernels == kernels
    io = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in io.items()}
    out = model(io["inputs"], noise=io["noise"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return io, out, grads


@pytest.mark.parametrize("name", ["tiny64", "mae_tiny64"])
def test_model_triton_equals_torch(name):
    require_fixtures(name)
    io, tri, g_tri = run(name, "triton")
    _, ref, g_ref = run(name, "torch")
    assert torch.equal(tri.mask, ref.mask) and torch.equal(tri.ids_restore, ref.ids_restore)
    assert torch.equal(tri.mask, io["mask"]) and torch.equal(tri.ids_restore, io["ids_restore"])
    # the fixture README tolerances, against torch and against mmpretrain itself
    for other, what in ((ref.loss, "torch"), (io["loss"], "mmpretrain")):
        assert abs(tri.loss.item() - other.item()) < 1e-5, what
    assert rel(tri.latent, ref.latent) < 1e-5 and rel(tri.latent, io["latent"]) < 1e-4
    assert rel(tri.pred, ref.pred) < 1e-5 and rel(tri.pred, io["pred"]) < 1e-4
    assert set(g_tri) == set(g_ref)
    worst = max(rel(g_tri[k], g_ref[k]) for k in g_ref)
    print(name, f"loss {tri.loss.item():.7f} vs torch {ref.loss.item():.7f}; max grad rel diff {worst:.2e}")
    assert worst < 1e-4
