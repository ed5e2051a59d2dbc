"""Fused-kernel benchmark: Triton vs eager torch reference vs torch.compile(reference), forward and forward+backward.

    python benchmarks/kernels.py [--out-dir benchmarks/results] [--dtype bf16] [--no-compile]   # CUDA
    python benchmarks/kernels.py --device cpu --quick                                          # CI smoke test
    python benchmarks/kernels.py --bytes                  # the analytic minimum bytes per op, ViT-B/L shapes

Shapes (CUDA): batch 256, 196 patches of which 49 kept (50 tokens with cls), K = 6 levels, decoder 512 wide,
for ViT-B (768) and ViT-L (1024); loss on 224 px images, patch 16. Reported per op and impl: median ms
(triton.testing.do_bench), GB/s against the bytes the op must move (below), % of the GPU's peak bandwidth,
speedup vs eager and vs compile, peak extra memory of one forward+backward vs eager. Results are written
after every op (JSON + markdown, atomically), so a timeout keeps what was measured.
On CPU (--device cpu) the Triton kernels run in the interpreter: the numbers only show the script works.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from mff_ds.common import DTYPES, write_json, write_text  # noqa: E402
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0}


def esize(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- op cases
# Each case states the minimum bytes its op must read and write (fwd, bwd) under the op's contract, so GB/s and
# % of peak bandwidth are computed, not guessed: every input read once, every output written once, nothing saved
# between passes but what the contract returns. e = bytes per element of the tested dtype; int64 ids 8 bytes,
# the float32 noise / mask 4. Terms below a few KB (LN weights, mask token, K logits) are left out.
def masking_case(K_, B, L, C, keep, dt, dev, kernels):
    def inputs():
        # tokens as the model passes them: a transposed view of the patch embedding's (B, C, L) output
        return [torch.randn(B, C, L, device=dev, dtype=dt).transpose(1, 2).requires_grad_(),
                torch.randn(1, L, C, device=dev, dtype=dt), torch.rand(B, L, device=dev)]
    e = esize(dt)
    return dict(
        inputs=inputs, out=lambda r: r[0],
        triton=lambda t, p, n: kernels.random_masking(t, p, n, keep, impl="triton"),
        torch=lambda t, p, n: kernels.random_masking_reference(t, p, n, keep),
        # fwd: noise; the kept token rows; the position table once | kept; mask; ids_restore; ids_keep
        fwd_bytes=B * L * 4 + B * keep * C * e + L * C * e + B * keep * C * e + B * L * 4 + B * L * 8 + B * keep * 8,
        # bwd: d(kept); where each kept row goes (ids_keep) | d(tokens), dense (zeros at removed patches)
        bwd_bytes=B * keep * C * e + B * keep * 8 + B * L * C * e)


def unmask_case(K_, B, L, C, keep, dt, dev, kernels, D=512):
    def inputs():
        ids = torch.argsort(torch.argsort(torch.rand(B, L, device=dev), dim=1), dim=1)
        # kept as the model passes it: the decoder tokens past the cls token
        return [torch.randn(B, 1 + keep, D, device=dev, dtype=dt)[:, 1:].requires_grad_(),
                torch.randn(1, 1, D, device=dev, dtype=dt, requires_grad=True), ids,
                torch.randn(1, L, D, device=dev, dtype=dt)]
    e = esize(dt)
    return dict(
        inputs=inputs, out=lambda r: r,
        triton=lambda k, m, i, p: kernels.unmask_tokens(k, m, i, p, impl="triton"),
        torch=lambda k, m, i, p: kernels.unmask_tokens_reference(k, m, i, p),
        # fwd: kept; ids_restore; the decoder position table once | out (B, L, D)
        fwd_bytes=B * keep * D * e + B * L * 8 + L * D * e + B * L * D * e,
        # bwd: d(out); ids_restore | d(kept) (d(mask_token) is D values)
        bwd_bytes=B * L * D * e + B * L * 8 + B * keep * D * e)


def fusion_case(K, B, L, C, keep, dt, dev, kernels):
    N = keep + 1

    def inputs():
        return [torch.randn(K, 1, 1, 1, device=dev, requires_grad=True),
                torch.randn(C, device=dev, dtype=dt, requires_grad=True),
                torch.randn(C, device=dev, dtype=dt, requires_grad=True)] + \
               [torch.randn(B, N, C, device=dev, dtype=dt, requires_grad=True) for _ in range(K)]
    e, M = esize(dt), B * N
    return dict(
        inputs=inputs, out=lambda r: r,
        triton=lambda lg, w, b, *lv: kernels.fused_fusion_layernorm(lv, lg, w, b, impl="triton"),
        torch=lambda lg, w, b, *lv: kernels.fused_fusion_layernorm_reference(lv, lg, w, b),
        # fwd: K levels | y
        fwd_bytes=(K + 1) * M * C * e,
        # bwd: d(y); the K levels again (d(w_k) = <d(fused), level_k> needs every level, so no saved fused row can
        # replace them) | K d(levels)
        bwd_bytes=(2 * K + 1) * M * C * e)


def loss_case(K_, B, L, C, keep, dt, dev, kernels, img=224, p=16):
    P = p * p * 3
    Lp = (img // p) ** 2

    def inputs():
        noise = torch.rand(B, Lp, device=dev)
        mask = (torch.argsort(torch.argsort(noise, 1), 1) >= Lp // 4).float()
        return [torch.randn(B, Lp, P, device=dev, dtype=dt, requires_grad=True),
                torch.randn(B, 3, img, img, device=dev, dtype=dt), mask]
    e, masked = esize(dt), B * (Lp - Lp // 4)
    return dict(
        inputs=inputs, out=lambda r: r,
        triton=lambda pr, im, m: kernels.norm_pix_loss(pr, im, m, p, impl="triton"),
        torch=lambda pr, im, m: kernels.norm_pix_loss_reference(pr, im, m, p),
        # fwd: mask; pred and pixels of the masked patches only (unmasked ones do not change the loss) | a scalar
        fwd_bytes=B * Lp * 4 + 2 * masked * P * e,
        # bwd: mask; pred and pixels of the masked patches again (saving pred - target instead would cost the
        # forward the same write) | d(pred), dense (zeros at unmasked patches)
        bwd_bytes=B * Lp * 4 + 2 * masked * P * e + B * Lp * P * e)


OPS = {"random_masking": masking_case, "unmask_tokens": unmask_case, "fusion_layernorm": fusion_case,
       "norm_pix_loss": loss_case}
SHAPES = {"vit_b": dict(K=6, B=256, L=196, C=768, keep=49), "vit_l": dict(K=6, B=256, L=196, C=1024, keep=49)}
QUICK = {"tiny": dict(K=3, B=2, L=16, C=72, keep=4)}


def cases(ops, shapes, dt, dev, kernels):
    """(op, shape name, case) for each op and shape; the loss has one shape (it does not depend on the width)."""
    for op in ops:
        for sname, kw in shapes.items():
            if op == "norm_pix_loss":
                if sname == "tiny":
                    yield op, sname, loss_case(0, 2, 0, 0, 0, dt, dev, kernels, img=32, p=8)
                elif sname == next(iter(shapes)):
                    yield op, "224p16", loss_case(0, kw["B"], 0, 0, 0, dt, dev, kernels)
                continue
            yield op, sname, OPS[op](kw["K"], kw["B"], kw["L"], kw["C"], kw["keep"], dt, dev, kernels)


def bytes_table(ops, dt, peak_gbps):
    out = [f"Minimum bytes per op ({str(dt).replace('torch.', '')}; shapes {SHAPES}, D = 512, loss 224 px patch 16) "
           f"and the time they take at {peak_gbps:.0f} GB/s:", "",
           "| op | shape | fwd MB | bwd MB | fwd+bwd MB | fwd µs at peak | fwd+bwd µs at peak |", "|---|---|---:|---:|---:|---:|---:|"]
    for op, sname, c in cases(ops, SHAPES, dt, "cpu", None):
        f, b = c["fwd_bytes"], c["bwd_bytes"]
        out.append(f"| {op} | {sname} | {f / 1e6:.1f} | {b / 1e6:.1f} | {(f + b) / 1e6:.1f} | "
                   f"{f / peak_gbps / 1e3:.1f} | {(f + b) / peak_gbps / 1e3:.1f} |")
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------------------- timing
def bench(fn, dev, reps):
    if dev == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=reps, return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def peak_extra_mem(fn, dev):
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_case(op, shape_name, case, impls, dev, reps, peak_gbps):
    inp = case["inputs"]()
    leaves = [t for t in inp if t.requires_grad]
    rows = []
    for impl in impls:
        fn = case["triton"] if impl == "triton" else case["torch"]
        if impl == "compile":
            fn = torch.compile(case["torch"], dynamic=False)
        out = case["out"](fn(*inp))
        grad = torch.randn_like(out)

        def fwd():
            with torch.no_grad():
                fn(*inp)

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            case["out"](fn(*inp)).backward(grad)
        fwd_bwd()  # warm up (compiles)
        res = {"op": op, "shape": shape_name, "impl": impl}
        for mode, f, nbytes in (("fwd", fwd, case["fwd_bytes"]), ("fwd+bwd", fwd_bwd,
                                                                   case["fwd_bytes"] + case["bwd_bytes"])):
            ms = bench(f, dev, reps)
            gbps = nbytes / ms / 1e6
            res[mode] = {"ms": ms, "GB/s": gbps, "bytes": nbytes,
                         "pct_peak_bw": 100 * gbps / peak_gbps if peak_gbps else None}
        for t in leaves:
            t.grad = None
        res["peak_extra_mem_bytes"] = peak_extra_mem(fwd_bwd, dev)
        rows.append(res)
        print(f"  {op:17s} {shape_name:6s} {impl:8s} fwd {res['fwd']['ms']:8.3f} ms  fwd+bwd "
              f"{res['fwd+bwd']['ms']:8.3f} ms", flush=True)
    by = {r["impl"]: r for r in rows}
    for r in rows:
        for mode in ("fwd", "fwd+bwd"):
            for base in ("torch", "compile"):
                if base in by:
                    r[mode][f"speedup_vs_{base}"] = by[base][mode]["ms"] / r[mode]["ms"]
        if r["peak_extra_mem_bytes"] is not None and by.get("torch", {}).get("peak_extra_mem_bytes"):
            r["mem_vs_eager"] = r["peak_extra_mem_bytes"] / by["torch"]["peak_extra_mem_bytes"]
    return rows


def markdown(meta, rows):
    out = [f"# Fused kernels: {meta['device']} ({meta['dtype']})", "",
           f"torch {meta['torch']}, triton {meta['triton']}; peak bandwidth assumed {meta['peak_gbps']} GB/s. "
           "Median ms (do_bench); GB/s vs the bytes the op must move; speedup = other / this.", "",
           "| op | shape | impl | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | % peak BW (f+b) | "
           "× eager (f+b) | × compile (f+b) | peak mem vs eager |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, s="{:.2f}": "—" if v is None else s.format(v)  # noqa: E731
    for r in rows:
        a, b = r["fwd"], r["fwd+bwd"]
        out.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {a['ms']:.3f} | {a['GB/s']:.0f} | {b['ms']:.3f} | "
                   f"{b['GB/s']:.0f} | {f(b['pct_peak_bw'], '{:.0f}%')} | {f(b.get('speedup_vs_torch'))} | "
                   f"{f(b.get('speedup_vs_compile'))} | {f(r.get('mem_vs_eager'))} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--reps", type=int, default=100, help="do_bench rep time in ms (CUDA)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="GPU peak memory bandwidth (default: by name)")
    ap.add_argument("--bytes", action="store_true", help="only print the analytic minimum bytes per op for the "
                    "ViT-B/L shapes and the time they take at --peak-gbps (default H200); runs nothing")
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"--ops: unknown {bad}, expected some of {list(OPS)}")
    dt = DTYPES[args.dtype]
    if args.bytes:
        print(bytes_table(ops, dt, args.peak_gbps or PEAK_GBPS["H200"]))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (use --device cpu --quick for a smoke test)")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    import triton
    from mff_ds import kernels

    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    if args.device == "cpu":
        peak = None
    shapes = QUICK if args.quick else SHAPES
    impls = ["triton", "torch"] + ([] if args.no_compile or args.device == "cpu" else ["compile"])
    meta = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "triton": triton.__version__,
            "peak_gbps": peak, "shapes": shapes, "quick": args.quick}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "kernels" + ("_quick" if args.quick else ""))
    rows = []
    for op, sname, case in cases(ops, shapes, dt, args.device, kernels):
        rows += run_case(op, sname, case, impls, args.device, args.reps, peak)
        write_json(stem + ".json", {"meta": meta, "results": rows}, indent=1)
        write_text(stem + ".md", markdown(meta, rows))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
