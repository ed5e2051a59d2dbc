"""The fused ops (`torch.library` custom ops) vs a float64 evaluation of their torch references, and opcheck.

Where the op runs: CUDA -> the compiled Triton kernels, in this process; CPU -> the ops' torch path (the
references, fusion and loss on float32 copies as the kernels compute, and autograd through them for the
backward ops) in this process, and the Triton kernels in the interpreter in a child pytest started with
TRITON_INTERPRET=1 (test_interpreter_run), which reruns these same tests.
Every buffer a kernel fills is allocated NaN-filled (ints: -1) through the `dispatch.empty` hook, so an
element a kernel forgets to write fails the comparison. Run: pytest tests/test_kernels.py (-s prints the
max errors per op output and dtype).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mff_ds import kernels
from mff_ds.kernels import dispatch
from mff_ds.kernels.fusion import fused_fusion_layernorm_reference
from mff_ds.kernels.loss import norm_pix_loss_reference
from mff_ds.kernels.masking import random_masking_reference, unmask_tokens_reference

CUDA = torch.cuda.is_available()
# The interpreter must be on before triton.language is first imported (its jit'd reductions are decorated
# then), which another test module may already have done in this process; hence the child process on CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
DTYPES = [torch.float32, torch.bfloat16]
MAX_ERR = {}


def _poison_empty(*shape, device=None, dtype=None, **kw):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    fill = float("nan") if dtype is None or dtype.is_floating_point else -1
    return torch.full(shape, fill, device=device, dtype=dtype)


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    if MAX_ERR:
        where = "triton" if CUDA or INTERPRET else "the torch path of the ops"
        print(f"\nmax |{where} - float64 reference| per op output and dtype:")
        for k, v in sorted(MAX_ERR.items()):
            print(f"  {k:45s} {v:.3e}")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(dispatch, "empty", _poison_empty)


def check(name, got, ref, dtype):
    """got (kernel, any dtype) vs ref (float64); records the max error."""
    assert got is not None, f"{name}: no gradient"
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten or poisoned element)"
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    key = f"{name} [{str(dtype).replace('torch.', '')}]"
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)
    torch.testing.assert_close(got.double(), ref.double(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def assert_same(got, ref):
    """Bit-identical to the same-dtype reference. The interpreter (CPU) converts float32 to bfloat16 by
    truncation, not round-to-nearest-even as GPUs do, so there bf16 may differ by one ulp."""
    if CUDA or got.dtype != torch.bfloat16:
        assert torch.equal(got, ref), (got.dtype, (got.double() - ref.double()).abs().max().item())
    else:
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=2 ** -7, atol=0)


def rand(*shape, dtype, grad=True, scale=1.0):
    x = (torch.randn(*shape, device=DEVICE) * scale).to(dtype)
    return x.requires_grad_(grad)


def f64(t, grad=True):
    return t.detach().double().requires_grad_(grad)


# ------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,C,len_keep,pos_grad", [(1, 1, 72, 1, True), (3, 50, 200, 12, False), (2, 50, 72, 50, True)])
def test_random_masking(dtype, B, L, C, len_keep, pos_grad):
    torch.manual_seed(0)
    tok, pos = rand(B, L, C, dtype=dtype), rand(1, L, C, dtype=dtype, grad=pos_grad)
    noise = torch.rand(B, L, device=DEVICE)
    kept, mask, ids_restore, ids_keep = kernels.random_masking(tok, pos, noise, len_keep, impl="triton")
    # identical to the same-dtype reference, bit for bit (positions are added before masking there)
    r_kept, r_mask, r_restore, r_keep = random_masking_reference(tok, pos, noise, len_keep)
    assert_same(kept, r_kept)
    assert torch.equal(mask, r_mask)
    assert torch.equal(ids_restore, r_restore) and torch.equal(ids_keep, r_keep)
    assert mask.dtype == noise.dtype and int(mask.sum()) == B * (L - len_keep)
    t64, p64 = f64(tok), f64(pos, pos_grad)
    k64 = random_masking_reference(t64, p64, noise, len_keep)[0]
    check("masking.kept", kept, k64, dtype)
    g = torch.randn_like(kept)
    grads = torch.autograd.grad(kept, [tok, pos] if pos_grad else [tok], g)
    refs = torch.autograd.grad(k64, [t64, p64] if pos_grad else [t64], g.double())
    for n, a, b in zip(("masking.d_tokens", "masking.d_pos"), grads, refs):
        assert a.dtype == dtype
        check(n, a, b, dtype)


def test_random_masking_mixed_dtype_and_fp32_positions():
    """bf16 tokens + float32 positions promote to float32, like the reference."""
    tok, pos = rand(2, 10, 24, dtype=torch.bfloat16), rand(1, 10, 24, dtype=torch.float32)
    noise = torch.rand(2, 10, device=DEVICE)
    kept = kernels.random_masking(tok, pos, noise, 3, impl="triton")[0]
    ref = random_masking_reference(tok, pos, noise, 3)[0]
    assert kept.dtype == torch.float32
    assert_same(kept, ref)
    g = torch.randn_like(kept)
    for a, b in zip(torch.autograd.grad(kept, [tok, pos], g), torch.autograd.grad(ref, [tok, pos], g)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,D,len_keep,pos_grad", [(1, 1, 72, 1, True), (3, 50, 200, 12, True), (2, 50, 72, 13, False)])
def test_unmask_tokens(dtype, B, L, D, len_keep, pos_grad):
    torch.manual_seed(1)
    ids_restore = torch.argsort(torch.argsort(torch.rand(B, L, device=DEVICE), dim=1), dim=1)
    kept, mt = rand(B, len_keep, D, dtype=dtype), rand(1, 1, D, dtype=torch.float32)
    pos = rand(1, L, D, dtype=dtype, grad=pos_grad)
    y = kernels.unmask_tokens(kept, mt, ids_restore, pos, impl="triton")
    assert_same(y, unmask_tokens_reference(kept, mt, ids_restore, pos))
    # float64 reference of the same function; the mask token is cast to kept's dtype first, as the reference does
    k64, p64, m64 = f64(kept), f64(pos, pos_grad), f64(mt)
    y64 = unmask_tokens_reference(k64, m64.detach().to(dtype).double() + (m64 - m64.detach()), ids_restore, p64)
    check("unmask.out", y, y64, dtype)
    g = torch.randn_like(y)
    ins, ins64 = [kept, mt] + ([pos] if pos_grad else []), [k64, m64] + ([p64] if pos_grad else [])
    for n, a, b in zip(("unmask.d_kept", "unmask.d_mask_token", "unmask.d_pos"),
                       torch.autograd.grad(y, ins, g), torch.autograd.grad(y64, ins64, g.double())):
        check(n, a, b, dtype)


def test_ops_take_the_models_strided_inputs():
    """As in the model: tokens are a transposed view (patch embed's NCL -> NLC), kept and pred are slices past
    the cls token, and the grads reaching the ops are slices of concatenation grads; the kernels read them all in
    place. Same values as the reference (masking/unmasking bit for bit) and the same gradients."""
    torch.manual_seed(7)
    B, C, keep, p = 2, 40, 3, 2
    images = torch.randn(B, 3, 6, 6, device=DEVICE)
    L, P = 9, 12
    tok = torch.randn(B, C, L, device=DEVICE).transpose(1, 2).requires_grad_()
    pos, noise = torch.randn(1, L, C, device=DEVICE), torch.rand(B, L, device=DEVICE)
    cls, mt = torch.randn(1, 1, C, device=DEVICE, requires_grad=True), torch.randn(1, 1, C, device=DEVICE, requires_grad=True)
    head = torch.randn(C, P, device=DEVICE, requires_grad=True)
    assert not tok.is_contiguous()
    outs = {}
    for impl in ("triton", "torch"):
        kept, mask, ids_restore, _ = kernels.random_masking(tok, pos, noise, keep, impl=impl)
        x = torch.cat([cls.expand(B, -1, -1), kept], dim=1).sin()
        y = kernels.unmask_tokens(x[:, 1:], mt, ids_restore, pos, impl=impl)
        pred = (torch.cat([x[:, :1], y], dim=1) @ head)[:, 1:]
        loss = kernels.norm_pix_loss(pred, images, mask, p, impl=impl)
        outs[impl] = [kept, y, loss, *torch.autograd.grad(loss, [tok, cls, mt, head])]
    for name, a, b in zip(("kept", "unmasked"), outs["triton"], outs["torch"]):
        assert torch.equal(a, b), name
    for name, a, b in zip(("loss", "d_tokens", "d_cls", "d_mask_token", "d_head"), outs["triton"][2:], outs["torch"][2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------------------------- fusion
FUSION_CASES = [(1, 1, 1, 72), (2, 3, 50, 200), (3, 1, 50, 72), (4, 3, 1, 200), (5, 1, 7, 72), (6, 3, 50, 72),
                (7, 2, 3, 200), (8, 1, 50, 200)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,B,N,C", FUSION_CASES)
def test_fused_fusion_layernorm(dtype, K, B, N, C):
    torch.manual_seed(K)
    levels = [rand(B, N, C, dtype=dtype, scale=1 + k) for k in range(K)]
    logits = (0.5 * torch.randn(K, 1, 1, 1, device=DEVICE)).requires_grad_()
    w, b = rand(C, dtype=torch.float32), rand(C, dtype=torch.float32)
    y = kernels.fused_fusion_layernorm(levels, logits, w, b, eps=1e-6, impl="triton")
    assert y.shape == (B, N, C) and y.dtype == dtype
    lv64, lg64, w64, b64 = [f64(x) for x in levels], f64(logits), f64(w), f64(b)
    y64 = fused_fusion_layernorm_reference(lv64, lg64, w64, b64, 1e-6)
    check("fusion.out", y, y64, dtype)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, levels + [logits, w, b], g)
    ref = torch.autograd.grad(y64, lv64 + [lg64, w64, b64], g.double())
    for k in range(K):
        check("fusion.d_level", got[k], ref[k], dtype)
    # d(logits) and the LN affine grads are float32 reductions over B*N*C products of bf16 inputs
    for n, a, r in zip(("fusion.d_logits", "fusion.d_ln_weight", "fusion.d_ln_bias"), got[K:], ref[K:]):
        assert a.dtype == torch.float32 and a.shape == r.shape
        check(n, a, r, dtype)



def test_fusion_takes_the_mixed_levels_of_autocast():
    """Under autocast the projected levels are bf16 and the last one (the residual stream) float32: every impl takes
    them, promoted like the reference's stack, and gives each level its gradient in its own dtype."""
    torch.manual_seed(0)
    f32, bf16 = torch.float32, torch.bfloat16
    levels = [rand(2, 5, 24, dtype=bf16), rand(2, 5, 24, dtype=bf16), rand(2, 5, 24, dtype=f32)]
    logits, w, b = (0.5 * torch.randn(3, device=DEVICE)).requires_grad_(), rand(24, dtype=f32), rand(24, dtype=f32)
    ref = fused_fusion_layernorm_reference(levels, logits, w, b)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, levels + [logits], g)
    for impl in dispatch.IMPLS:
        y = kernels.fused_fusion_layernorm(levels, logits, w, b, impl=impl)
        assert y.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(y, ref, **TOL[torch.bfloat16])
        grads = torch.autograd.grad(y, levels + [logits], g)
        for a, r in zip(grads, ref_grads):
            assert a.dtype == r.dtype
            torch.testing.assert_close(a, r, **TOL[torch.bfloat16])

# ---------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("B,H,W,p", [(1, 8, 8, 8), (3, 20, 30, 5), (1, 28, 14, 14)])
def test_norm_pix_loss(dtype, norm_pix, B, H, W, p):
    torch.manual_seed(2)
    L, P = (H // p) * (W // p), p * p * 3
    pred = rand(B, L, P, dtype=dtype)
    images = torch.randn(B, 3, H, W, device=DEVICE).to(dtype)
    mask = (torch.rand(B, L, device=DEVICE) < 0.75).float()
    mask[0, 0] = 1.0
    loss = kernels.norm_pix_loss(pred, images, mask, p, norm_pix=norm_pix, impl="triton")
    p64 = f64(pred)
    l64 = norm_pix_loss_reference(p64, images.double(), mask.double(), p, 1e-6, norm_pix)
    assert loss.dim() == 0
    check("loss.value", loss, l64, torch.float32 if loss.dtype == torch.float32 else dtype)
    (g,) = torch.autograd.grad(loss * 3.0, pred)
    (g64,) = torch.autograd.grad(l64 * 3.0, p64)
    assert g.dtype == dtype
    # gradients are O(1 / numel): compare relative to their scale
    scale = g64.abs().max()
    check("loss.d_pred (relative)", g / scale, g64 / scale, dtype)
    assert torch.all(g[mask == 0] == 0), "unmasked patches must get zero gradient"


# ------------------------------------------------------------------------------- custom ops: opcheck, compile
def _op_cases():
    """Arguments for every mff_ds op: odd sizes, a bf16 + float32 mix where the op promotes."""
    torch.manual_seed(5)
    B, L, C, keep, N = 2, 7, 24, 3, 5

    def r(*shape, grad=True, dtype=torch.float32):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)
    noise = torch.rand(B, L, device=DEVICE)
    ids_restore = torch.argsort(torch.argsort(noise, 1), 1)
    levels, w = [r(B, N, C) for _ in range(3)], torch.softmax(torch.randn(3, device=DEVICE), 0).requires_grad_()
    lnw, lnb = r(C), r(C)
    _, mean, rstd = torch.ops.mff_ds.fusion_layernorm(levels, w, lnw, lnb, 1e-6)
    pred, images = r(B, 6, 75), torch.randn(B, 3, 10, 15, device=DEVICE)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], device=DEVICE)
    return {
        "random_masking": (r(B, L, C, dtype=torch.bfloat16), r(1, L, C), noise, keep),
        "random_masking_backward": (r(B, keep, C, grad=False), ids_restore),
        "unmask_tokens": (r(B, keep, C), r(C), ids_restore, r(1, L, C, dtype=torch.bfloat16)),
        "unmask_tokens_backward": (r(B, L, C, grad=False), ids_restore, keep, torch.bfloat16),
        "fusion_layernorm": (levels, w, lnw, lnb, 1e-6),
        "fusion_layernorm_backward": (r(B, N, C, grad=False), [x.detach() for x in levels], w.detach(),
                                      lnw.detach(), mean, rstd, 1e-6),
        "norm_pix_loss": (pred, images, mask, 5, 1e-6, True),
        "norm_pix_loss_backward": (torch.rand(B, 6, device=DEVICE), pred.detach(), images, mask, 5, 1e-6, False),
    }


def test_every_op_has_an_opcheck_case():
    assert set(torch.ops.mff_ds._dir) == set(_op_cases())


@pytest.mark.parametrize("name", sorted(_op_cases()))
def test_opcheck(name):
    """Schema, fake (meta) implementation vs the real one, autograd registration, AOT dispatch with dynamic shapes."""
    torch.library.opcheck(getattr(torch.ops.mff_ds, name).default, _op_cases()[name])


TINY_MFF = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, out_indices=[0, 1, 3])


@pytest.mark.parametrize("kernels_impl,backend", [("triton", "aot_eager"), ("auto", "aot_eager"), ("triton", "inductor")])
def test_compiled_model_fullgraph(kernels_impl, backend):
    """torch.compile(fullgraph=True) traces a small MFF with the fused ops (no graph break: it raises otherwise)
    and gives the eager loss and gradients: |loss diff| <= 1e-6, every grad within 1e-5 relative (float32)."""
    if backend == "inductor" and not CUDA:
        pytest.skip("inductor's C++ codegen takes ~80 s on 2 cores; aot_eager traces the same graph on CPU")
    from mff_ds.models import build_model
    torch.manual_seed(6)
    model = build_model({**TINY_MFF, "kernels": kernels_impl}).train().to(DEVICE)
    x, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    graphs = []

    def capture(gm, example_inputs):  # records the Dynamo graph, then hands it to the backend under test
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    outs, grads = [], []
    for fn in (model, torch.compile(model, fullgraph=True, backend=capture)):
        model.zero_grad(set_to_none=True)
        out = fn(x, noise=noise)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch._dynamo.reset()
    assert len(graphs) == 1
    called = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    fused = {f"mff_ds.{op}.default" for op in ("random_masking", "fusion_layernorm", "unmask_tokens", "norm_pix_loss")}
    assert fused <= called if kernels_impl == "triton" or CUDA else not fused & called, sorted(called)
    assert abs(outs[1].loss.item() - outs[0].loss.item()) <= 1e-6
    assert torch.equal(outs[1].mask, outs[0].mask)
    assert set(grads[0]) == set(grads[1]) and "fusion_logits" in grads[0]
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=n)


# ------------------------------------------------------------------------------------- references, errors
def test_gradcheck_references():
    torch.manual_seed(3)
    d = dict(dtype=torch.float64, requires_grad=True)
    tok, pos, noise = torch.randn(2, 6, 5, **d), torch.randn(1, 6, 5, **d), torch.rand(2, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t, p: random_masking_reference(t, p, noise, 2)[0], (tok, pos))
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    kept, mt = torch.randn(2, 2, 5, **d), torch.randn(1, 1, 5, **d)
    assert torch.autograd.gradcheck(lambda k, m, p: unmask_tokens_reference(k, m, ids_restore, p), (kept, mt, pos))
    levels = [torch.randn(2, 3, 5, **d) for _ in range(3)]
    logits, w, b = torch.randn(3, 1, 1, 1, **d), torch.randn(5, **d), torch.randn(5, **d)
    assert torch.autograd.gradcheck(lambda *a: fused_fusion_layernorm_reference(a[:3], *a[3:]),
                                    (*levels, logits, w, b))
    pred, images = torch.randn(2, 4, 12, **d), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.float64)
    for norm in (True, False):
        assert torch.autograd.gradcheck(lambda p: norm_pix_loss_reference(p, images, mask, 2, 1e-6, norm), (pred,))


def _bad_calls():
    """name -> (exception, message pattern, call(impl)): a few bad calls of each public op."""
    d = dict(device=DEVICE)
    x, pos, noise = torch.randn(2, 4, 8, **d), torch.randn(1, 4, 8, **d), torch.rand(2, 4, **d)
    ids, kept, mt = torch.argsort(noise, dim=1), torch.randn(2, 3, 8, **d), torch.randn(1, 1, 8, **d)
    w, b = torch.ones(8, **d), torch.zeros(8, **d)
    pred, img, mask = torch.randn(1, 4, 12, **d), torch.randn(1, 3, 4, 4, **d), torch.ones(1, 4, **d)
    masking = kernels.random_masking
    return {
        "masking pos_embed shape": (ValueError, r"pos_embed must be \(1, 4, 8\), got \(1, 5, 8\)",
                                    lambda i: masking(x, torch.randn(1, 5, 8, **d), noise, 2, impl=i)),
        "masking len_keep": (ValueError, r"len_keep must be in \[0, 4\], got 5",
                             lambda i: masking(x, pos, noise, 5, impl=i)),
        "masking noise dtype": (TypeError, "noise must be floating point, got torch.int64",
                                lambda i: masking(x, pos, ids, 2, impl=i)),
        "masking tokens dtype": (TypeError, "tokens: expected dtype in",
                                 lambda i: masking(x.double(), pos, noise, 2, impl=i)),
        "masking devices": (ValueError, "expected all inputs on one device, got tokens on .*, pos_embed on meta",
                            lambda i: masking(x, pos.to("meta"), noise, 2, impl=i)),
        "unmask ids dtype": (TypeError, "ids_restore must be int64, got torch.int32",
                             lambda i: kernels.unmask_tokens(kept, mt, ids.int(), pos, impl=i)),
        "unmask mask_token size": (ValueError, r"mask_token must be \(1, 1, 8\), got \(1, 1, 7\)",
                                   lambda i: kernels.unmask_tokens(kept, mt[..., :7], ids, pos, impl=i)),
        "unmask ids length": (ValueError, r"ids_restore must be \(2, L >= 3\), got \(2, 2\)",
                              lambda i: kernels.unmask_tokens(kept, mt, ids[:, :2], pos, impl=i)),
        "fusion level count": (ValueError, "expected 1 to 8 levels, got 9",
                               lambda i: kernels.fused_fusion_layernorm([x] * 9, torch.zeros(9, **d), w, b, impl=i)),
        "fusion level shape": (ValueError, "level 1 is",
                               lambda i: kernels.fused_fusion_layernorm([x, x[:1]], torch.zeros(2, **d), w, b, impl=i)),
        "fusion logits count": (ValueError, "logits must have 2 entries",
                                lambda i: kernels.fused_fusion_layernorm([x, x], torch.zeros(3, **d), w, b, impl=i)),
        "fusion ln shape": (ValueError, r"weight and bias must be \(8,\) tensors, got \(8,\) and \(7,\)",
                            lambda i: kernels.fused_fusion_layernorm([x, x], torch.zeros(2, **d), w, b[:7], impl=i)),
        "loss pred shape": (ValueError, r"pred must be \(1, 4, 12\)",
                            lambda i: kernels.norm_pix_loss(pred[..., :11], img, mask, 2, impl=i)),
        "loss pred dtype": (TypeError, "pred: expected dtype in",
                            lambda i: kernels.norm_pix_loss(pred.double(), img, mask, 2, impl=i)),
        "loss patch size": (ValueError, "image size 4x4 must be a multiple of patch_size, got 3",
                            lambda i: kernels.norm_pix_loss(pred, img, mask, 3, impl=i)),
        "loss mask shape": (ValueError, r"mask must be \(1, 4\), got \(4,\)",
                            lambda i: kernels.norm_pix_loss(pred, img, mask[0], 2, impl=i)),
    }


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_bad_call_fails_alike_for_every_impl(name):
    """Each public op checks its inputs before it picks an impl, so every impl ("torch": the reference,
    "triton": the custom op, here on CPU its torch path) refuses a bad call with the same error, naming what
    was expected and what was given."""
    exc, match, call = _bad_calls()[name]
    errors = []
    for impl in dispatch.IMPLS:
        with pytest.raises(exc, match=match) as e:
            call(impl)
        errors.append(str(e.value))
    assert errors.count(errors[0]) == len(errors), errors


def test_bad_call_other_checks():
    noise = torch.rand(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"masking_indices: noise must be \(B, L\), got shape \(8,\)"):
        kernels.masking_indices(noise.reshape(-1), 2)
    with pytest.raises(ValueError, match=r"masking_indices: len_keep must be in \[0, 4\], got -1"):
        kernels.masking_indices(noise, -1)
    with pytest.raises(ValueError, match="kernels impl"):
        kernels.norm_pix_loss(torch.randn(1, 4, 12), torch.randn(1, 3, 4, 4), torch.ones(1, 4), 2, impl="cuda")


def test_interpreter_run():
    """On CPU: run this file's op tests and tests/test_kernels_model.py under TRITON_INTERPRET=1."""
    if CUDA or INTERPRET:
        pytest.skip("kernel tests run in this process (CUDA, or already the interpreter child)")
    here = Path(__file__).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = str(here.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-o", "addopts=",
                        str(here), str(here.parent / "test_kernels_model.py")],
                       env=env, cwd=here.parents[1], capture_output=True, text=True, timeout=600)
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]


AOT = r"""
import re
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from mff_ds.kernels import masking_triton as mt, fusion_triton as ft, loss_triton as lt
def loop_barriers(ptx):
    # bar.sync between the row loop's header label and its back branch
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) for m in [re.match(r"(\$L__BB\d+_\d+):", l.strip())] if m}
    back = [(labels[m.group(1)], i) for i, l in enumerate(lines)
            for m in [re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", l)] if m and labels.get(m.group(1), i) < i]
    a, b = max(back, key=lambda ab: ab[1] - ab[0])
    return "\n".join(lines[a:b]).count("bar.sync")
def comp(tuned, sig, consts, max_loop_barriers=None):
    # every autotune config (rows per tile R, warps) must lower for sm_90 (layout, registers); for float32,
    # which only changes the pointer types, the first config is enough
    for cfg in tuned.configs if dt == "bf16" else tuned.configs[:1]:
        fn = tuned.fn
        full = {n: sig.get(n, "constexpr") for n in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=full, constexprs={**consts, **cfg.kwargs}),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
        assert k.asm["cubin"], (fn, cfg)
        if max_loop_barriers is not None:
            assert loop_barriers(k.asm["ptx"]) <= max_loop_barriers, (fn, cfg, loop_barriers(k.asm["ptx"]))
rows = dict(L="i32", len_keep="i32", BL="i32")
for dt in ("bf16", "fp32"):
    comp(mt._mask_fwd_kernel, dict(tok_ptr="*"+dt, pos_ptr="*fp32", shuffle_ptr="*i64", kept_ptr="*fp32", mask_ptr="*fp32",
         restore_ptr="*i64", C="i32", tok_sb="i32", tok_sl="i32", tok_sc="i32", **rows), {"BLOCK": 1024})
    comp(mt._mask_bwd_kernel, dict(gkept_ptr="*"+dt, restore_ptr="*i64", gtok_ptr="*"+dt, C="i32", gk_sb="i32", gk_sr="i32",
         **rows), {"BLOCK": 1024})
    comp(mt._unmask_fwd_kernel, dict(kept_ptr="*"+dt, mt_ptr="*"+dt, restore_ptr="*i64", pos_ptr="*fp32", out_ptr="*fp32",
         D="i32", kept_sb="i32", kept_sr="i32", **rows), {"BLOCK": 512})
    comp(mt._unmask_bwd_kernel, dict(gout_ptr="*fp32", restore_ptr="*i64", gkept_ptr="*"+dt, gmt_part_ptr="*fp32",
         D="i32", rows_per_prog="i32", go_sb="i32", go_sl="i32", **rows), {"BLOCK": 512})
    xs = {f"x{i}": "*"+dt for i in range(8)}
    for K in (1, 6, 8):
        comp(ft._fusion_fwd_kernel, dict(**xs, w_ptr="*fp32", lnw_ptr="*fp32", lnb_ptr="*fp32", y_ptr="*"+dt, mean_ptr="*fp32",
             rstd_ptr="*fp32", M="i32", C="i32", eps="fp32"), {"K": K, "BLOCK": 1024})
        comp(ft._fusion_bwd_kernel, dict(**xs, **{f"d{i}": "*"+dt for i in range(8)}, w_ptr="*fp32", lnw_ptr="*fp32",
             dy_ptr="*"+dt, mean_ptr="*fp32", rstd_ptr="*fp32", part_ptr="*fp32", M="i32", C="i32",
             rows_per_prog="i32"), {"K": K, "BLOCK": 1024},
             max_loop_barriers=4)  # per row tile only LayerNorm's two block reductions, not one per level too
    for norm in (True, False):
        s = dict(img_ptr="*fp32", pred_ptr="*"+dt, mask_ptr="*fp32", BL="i32", L="i32", GW="i32", H="i32", W="i32",
                 P="i32", eps="fp32", pred_sb="i32", pred_sl="i32")
        comp(lt._npl_fwd_kernel, dict(**s, loss_ptr="*fp32"), {"PATCH": 14, "CH": 3, "NORM": norm, "BLOCK": 1024})
        comp(lt._npl_bwd_kernel, dict(**s, gloss_ptr="*fp32", dpred_ptr="*"+dt), {"PATCH": 16, "CH": 3, "NORM": norm,
             "BLOCK": 1024})
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not lower kernels; compile each one, in every autotune config, to a cubin for sm_90
    (no GPU needed)."""
    if INTERPRET or CUDA:
        pytest.skip("done by the parent process" if INTERPRET else "the kernels compile for real on this GPU")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MFF_DS_AUTOTUNE")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_vit_b_shapes(dtype):
    torch.manual_seed(4)
    B, L, C, keep, K, D = 64, 196, 768, 49, 6, 512
    tok, pos = rand(B, L, C, dtype=dtype), rand(1, L, C, dtype=dtype, grad=False)
    noise = torch.rand(B, L, device=DEVICE)
    kept, mask, ids_restore, _ = kernels.random_masking(tok, pos, noise, keep)  # impl auto -> triton on CUDA
    assert torch.equal(kept, random_masking_reference(tok, pos, noise, keep)[0])
    kd, mt, dpos = rand(B, keep, D, dtype=dtype), rand(1, 1, D, dtype=dtype), rand(1, L, D, dtype=dtype, grad=False)
    assert torch.equal(kernels.unmask_tokens(kd, mt, ids_restore, dpos), unmask_tokens_reference(kd, mt, ids_restore, dpos))
    levels = [rand(B, keep + 1, C, dtype=dtype) for _ in range(K)]
    logits, w, b = torch.randn(K, 1, 1, 1, device=DEVICE), rand(C, dtype=dtype), rand(C, dtype=dtype)
    y = kernels.fused_fusion_layernorm(levels, logits, w, b)
    check("cuda.fusion.out", y, fused_fusion_layernorm_reference([x.double() for x in levels], logits.double(),
                                                                 w.double(), b.double()), dtype)
    pred = rand(B, L, 768, dtype=dtype)
    images = torch.randn(B, 3, 224, 224, device=DEVICE)
    loss = kernels.norm_pix_loss(pred, images, mask, 16)
    check("cuda.loss.value", loss, norm_pix_loss_reference(pred.double(), images.double(), mask.double(), 16), dtype)
