"""Analytic ZeRO-2 scaling model: step time and efficiency from 1 to 512 GPUs at a fixed effective batch.

    python benchmarks/scaling_model.py --from-json benchmarks/results/throughput_cuda.json
    python benchmarks/scaling_model.py --step-ms 420 --micro-batch 256 --arch mff_vit_base_patch16
    python benchmarks/scaling_model.py --measure-cpu      # 1 vs 2 gloo ranks on this CPU (tiny model, < 2 min)
    python benchmarks/scaling_model.py --paths            # ZeRO-2 (overlapped) vs hook-free ZeRO-1, ViT-B/L/H

--paths compares the two DeepSpeed paths (docs/ENGINE.md "Which path"): (a) ZeRO-2 as shipped until 2026-12-04,
which reduce-scatters the gradients every micro step, overlapped with the backward (`--overlap`, default 1 here),
at the price of DeepSpeed's per-parameter gradient hooks (`--hook-us` host microseconds per parameter tensor per
micro step; default from the CPU proxy, benchmarks/results/ddp_overhead_w1); (b) ZeRO-1 without hooks, which
reduces once per optimizer step after the last backward, not overlapped. Compute per image: the official MAE
loop's ViT-B step measured on an H200 (benchmarks/results/h200_2026-11-26: 80.1 ms per 256 images), scaled to
ViT-L/H by their training FLOPs.

Model, per optimizer step with N GPUs, effective batch G (default 4096), measured micro batch m and step time
t_m (forward + backward + optimizer on one device, from throughput.py):
  images per GPU b = G / N, micro batch min(m, b), accumulation A = ceil(b / m)
  compute      T_c = b * t_m / m                           (time per image independent of the batch size)
  reduce-scat. T_rs = A * [(N-1)/N * P*g / BW + (N-1) * a]  (DeepSpeed ZeRO-2 reduces grads every micro step)
  all-gather   T_ag =     (N-1)/N * P*w / BW + (N-1) * a    (updated bf16/fp32 params after the step)
  step         T = T_c + max(0, T_rs - overlap * 2/3 * T_c) + T_ag   (backward = 2/3 of compute)
  efficiency   E(N) = T_c(1) / (N * T(N))                   (per-GPU throughput relative to one GPU)
P parameters, g / w bytes per gradient / parameter element (2 in bf16/fp16, 4 in fp32), BW and a the NCCL bus
bandwidth and per-hop latency: intra-node (NVLink) while N <= GPUs per node, inter-node beyond.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
from mff_ds.common import atomic_write, write_json, write_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--from-json", default=None, help="a throughput.py JSON: step time, micro batch, params, precision")
    p.add_argument("--model", choices=("mff", "mae"), default="mff", help="which entry of --from-json")
    p.add_argument("--step-ms", type=float, default=None, help="measured single-device step time (ms)")
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--arch", default="mff_vit_base_patch16", help="for the parameter count without --from-json")
    p.add_argument("--params-m", type=float, default=None, help="trainable parameters (millions); overrides --arch")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=360.0, help="intra-node NCCL bus bandwidth, GB/s (NVLink)")
    p.add_argument("--inter-gbps", type=float, default=100.0,
                   help="inter-node NCCL bus bandwidth per GPU, GB/s (8x400 Gb/s InfiniBand per node at ~50%%)")
    p.add_argument("--intra-latency-us", type=float, default=5.0)
    p.add_argument("--inter-latency-us", type=float, default=15.0)
    p.add_argument("--overlap", type=float, default=None,
                   help="fraction of the backward that hides the gradient reduce-scatter (overlap_comm); 0..1 "
                        "(default 0; --paths: 1)")
    p.add_argument("--max-gpus", type=int, default=512)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--json", default=None, metavar="OUT", help="default <out-dir>/scaling_model.json")
    p.add_argument("--measure-cpu", action="store_true", help="measure 1 vs 2 gloo ranks on this CPU")
    p.add_argument("--steps", type=int, default=12, help="timed steps per rank count (--measure-cpu)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # torchrun child: write results here
    p.add_argument("--paths", action="store_true", help="ZeRO-2 (overlapped, hooks) vs ZeRO-1 (no hooks): ViT-B/L/H")
    p.add_argument("--hook-us", type=float, default=HOOK_US,
                   help="--paths: host us per parameter tensor per micro step of ZeRO-2's gradient hooks")
    args = p.parse_args(argv)
    if args.overlap is None:  # the main curve: none hidden; --paths: ZeRO-2 as designed, all of it hidden
        args.overlap = 1.0 if args.paths else 0.0
    if not 0.0 <= args.overlap <= 1.0:
        p.error(f"--overlap: expected a fraction in [0, 1], got {args.overlap}")
    for k in ("global_batch", "gpus_per_node", "max_gpus", "micro_batch", "steps"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')}: expected an integer >= 1, got {getattr(args, k)}")
    return args


# ------------------------------------------------------------------ the model
def ring_time(nbytes: float, n: int, bw_gbps: float, latency_us: float) -> float:
    """Seconds for a ring reduce-scatter or all-gather of an `nbytes` buffer over n ranks."""
    if n == 1:
        return 0.0
    return (n - 1) / n * nbytes / (bw_gbps * 1e9) + (n - 1) * latency_us * 1e-6


def step_model(n: int, *, step_s: float, micro_batch: int, params: float, grad_bytes: int, param_bytes: int,
               global_batch: int, gpus_per_node: int, intra_gbps: float, inter_gbps: float,
               intra_latency_us: float, inter_latency_us: float, overlap: float) -> dict:
    per_gpu = global_batch / n
    micro = min(micro_batch, per_gpu)
    accum = math.ceil(per_gpu / micro)
    t_c = per_gpu * step_s / micro_batch
    bw, lat = (intra_gbps, intra_latency_us) if n <= gpus_per_node else (inter_gbps, inter_latency_us)
    t_rs = accum * ring_time(params * grad_bytes, n, bw, lat)
    t_ag = ring_time(params * param_bytes, n, bw, lat)
    exposed = max(0.0, t_rs - overlap * 2 / 3 * t_c) + t_ag
    t = t_c + exposed
    t1 = global_batch * step_s / micro_batch
    return {"gpus": n, "images_per_gpu": per_gpu, "micro_batch": micro, "accum": accum, "compute_s": t_c,
            "reduce_scatter_s": t_rs, "all_gather_s": t_ag, "exposed_comm_s": exposed, "step_s": t,
            "efficiency": t1 / (n * t), "images_per_s": global_batch / t}


# --paths inputs. HOOK_US: ZeRO-2's host time over hook-free ZeRO-1's on one CPU rank (benchmarks/results/
# ddp_overhead_w1.md: 4.1 ms per step over 265 tensors); a GPU node's host cores may be faster (then the hooks cost
# less) but the hooks run on the critical path of a host-bound step either way.
HOOK_US = 15.0
# the official MAE loop's ViT-B/16 step on an H200, bf16 autocast, 256 images (h200_2026-11-26/throughput_cuda.md)
MEASURED = {"arch": "mae_vit_base_patch16", "step_s": 0.0801, "micro_batch": 256}
PATH_ARCHS = {"mff_vit_base_patch16": 512, "mff_vit_large_patch16": 256, "mff_vit_huge_patch14": 128}  # micro batch
PATH_GPUS = (8, 64, 256)


def path_model(n: int, *, tensors: int, hook_us: float, **kw) -> dict:
    """Step time of (a) ZeRO-2, overlapped, hooks on every micro step and (b) ZeRO-1, one reduce, no hooks."""
    a = step_model(n, **kw)
    a["step_s"] += a["accum"] * tensors * hook_us * 1e-6
    b = step_model(n, **dict(kw, overlap=0.0))
    one_reduce = b["reduce_scatter_s"] / b["accum"]
    b["step_s"] = b["compute_s"] + one_reduce + b["all_gather_s"]
    b["reduce_scatter_s"], b["exposed_comm_s"] = one_reduce, one_reduce + b["all_gather_s"]
    return {"gpus": n, "accum": a["accum"], "zero2_step_s": a["step_s"], "zero1_step_s": b["step_s"],
            "zero1_over_zero2": b["step_s"] / a["step_s"], "zero1_exposed_s": b["exposed_comm_s"],
            "zero2_hooks_s": a["accum"] * tensors * hook_us * 1e-6}


def paths_main(args) -> dict:
    """--paths: the table docs/ENGINE.md shows; which path is faster per model size and GPU count."""
    import torch

    from mff_ds.models import build_model, resolve_config
    from mff_ds.models.flops import flops_per_image
    per_image = MEASURED["step_s"] / MEASURED["micro_batch"] / flops_per_image(resolve_config(MEASURED["arch"]))
    overlap = args.overlap
    rows = []
    for arch, micro in PATH_ARCHS.items():
        with torch.device("meta"):  # shapes only
            model = build_model(arch, kernels="torch")
        params = [p for p in model.parameters() if p.requires_grad]
        step_s = per_image * flops_per_image(model.cfg) * micro
        kw = dict(step_s=step_s, micro_batch=micro, params=float(sum(p.numel() for p in params)), grad_bytes=2,
                  param_bytes=2, global_batch=args.global_batch, gpus_per_node=args.gpus_per_node,
                  intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps, intra_latency_us=args.intra_latency_us,
                  inter_latency_us=args.inter_latency_us, overlap=overlap)
        for n in PATH_GPUS:
            rows.append(dict(path_model(n, tensors=len(params), hook_us=args.hook_us, **kw), arch=arch,
                             micro_batch=micro, params_m=kw["params"] / 1e6, tensors=len(params)))
        del model
    md = [f"Effective batch {args.global_batch}, bf16 gradients and parameters, {args.intra_gbps:g} GB/s within a "
          f"node of {args.gpus_per_node}, {args.inter_gbps:g} GB/s per GPU across nodes; ZeRO-2's reduce hidden "
          f"behind {overlap:.0%} of the backward, its hooks {args.hook_us:g} us per tensor per micro step.", "",
          "| model | GPUs | accum | ZeRO-2 step ms (hooks ms) | ZeRO-1 step ms (exposed comm ms) | ZeRO-1 / ZeRO-2 |",
          "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['arch']} ({r['params_m']:.0f} M, {r['tensors']} tensors) | {r['gpus']} | {r['accum']} | "
                  f"{1e3 * r['zero2_step_s']:.1f} ({1e3 * r['zero2_hooks_s']:.1f}) | {1e3 * r['zero1_step_s']:.1f} "
                  f"({1e3 * r['zero1_exposed_s']:.1f}) | {r['zero1_over_zero2']:.3f} |")
    md += ["", "Command: `python benchmarks/scaling_model.py " + " ".join(sys.argv[1:]) + "`", ""]
    print("\n".join(md))
    res = {"rows": rows, "hook_us": args.hook_us, "overlap": overlap, "measured": MEASURED,
           "args": {k: v for k, v in vars(args).items() if k != "worker"}}
    stem = os.path.splitext(args.json)[0] if args.json else os.path.join(args.out_dir, "scaling_paths")
    write_json(stem + ".json", res)
    write_text(stem + ".md", "\n".join(md))
    print(f"wrote {stem}.json, {stem}.md")
    return res


def gpu_counts(max_gpus: int):
    n, out = 1, []
    while n <= max_gpus:
        out.append(n)
        n *= 2
    return out


def count_params(arch: str) -> float:
    from mff_ds.models import build_model
    m = build_model(arch)
    return float(sum(p.numel() for p in m.parameters() if p.requires_grad))


def inputs_from(args) -> dict:
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        try:
            r, c = res[args.model], res["config"]
            return {"step_s": r["step_ms"] / 1e3, "micro_batch": c["micro_batch"], "params": r["params_m"] * 1e6,
                    "precision": c["precision"], "source": f"{args.from_json} ({args.model}, {res.get('device')})"}
        except KeyError as e:
            raise SystemExit(f"--from-json: expected a throughput.py JSON with {args.model}.step_ms, "
                             f"config.micro_batch, {args.model}.params_m; missing {e}")
    if args.step_ms is None:
        raise SystemExit("expected --step-ms (a measured single-device step time) or --from-json")
    params = args.params_m * 1e6 if args.params_m else count_params(args.arch)
    return {"step_s": args.step_ms / 1e3, "micro_batch": args.micro_batch, "params": params,
            "precision": args.precision, "source": f"--step-ms {args.step_ms} ({args.arch})"}


def curve(inp: dict, args, overlap: float):
    nbytes = 4 if inp["precision"] == "fp32" else 2
    kw = dict(step_s=inp["step_s"], micro_batch=inp["micro_batch"], params=inp["params"], grad_bytes=nbytes,
              param_bytes=nbytes, global_batch=args.global_batch, gpus_per_node=args.gpus_per_node,
              intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps, intra_latency_us=args.intra_latency_us,
              inter_latency_us=args.inter_latency_us, overlap=overlap)
    return [step_model(n, **kw) for n in gpu_counts(args.max_gpus)]


def plot(curves: dict, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, rows in curves.items():
        ax.plot([r["gpus"] for r in rows], [100 * r["efficiency"] for r in rows], marker="o", ms=3, label=label)
    ax.set_xscale("log", base=2)
    ns = [r["gpus"] for r in next(iter(curves.values()))]
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("GPUs")
    ax.set_ylabel("scaling efficiency (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def model_main(args) -> dict:
    inp = inputs_from(args)
    nbytes = 4 if inp["precision"] == "fp32" else 2
    assumptions = [
        f"measured: {inp['step_s'] * 1e3:.1f} ms per step at micro batch {inp['micro_batch']} on one device "
        f"({inp['source']})",
        f"parameters: {inp['params'] / 1e6:.1f} M; gradients reduce-scattered and parameters all-gathered "
        f"in {inp['precision']} ({nbytes} bytes/element)",
        f"effective batch {args.global_batch}; accumulation fills it; ZeRO-2 reduce-scatters the gradients every "
        f"micro step, all-gathers the parameters once per optimizer step",
        f"bus bandwidth {args.intra_gbps:g} GB/s within a node of {args.gpus_per_node} GPUs, {args.inter_gbps:g} GB/s "
        f"per GPU across nodes; {args.intra_latency_us:g} / {args.inter_latency_us:g} us per ring hop",
        "compute time per image does not depend on the per-GPU batch (optimistic below ~64 images per GPU); "
        "optimizer time is counted in the measured step and scales with the batch share (ZeRO shards it: "
        "slightly pessimistic); no data-loading stalls, no stragglers",
        f"overlap: the gradient reduce-scatter hides behind {args.overlap:.0%} of the backward (main curve); "
        "the chart also shows 0% and 100%",
    ]
    print("Assumptions:\n  " + "\n  ".join(assumptions))
    curves = {f"overlap {o:.0%}": curve(inp, args, o) for o in sorted({0.0, args.overlap, 1.0})}
    main = curve(inp, args, args.overlap)
    print(f"\n{'GPUs':>5} {'img/GPU':>8} {'accum':>5} {'compute ms':>10} {'RS ms':>8} {'AG ms':>8} "
          f"{'step ms':>9} {'img/s':>9} {'eff':>6}")
    for r in main:
        print(f"{r['gpus']:>5} {r['images_per_gpu']:>8g} {r['accum']:>5} {1e3 * r['compute_s']:>10.1f} "
              f"{1e3 * r['reduce_scatter_s']:>8.2f} {1e3 * r['all_gather_s']:>8.2f} {1e3 * r['step_s']:>9.1f} "
              f"{r['images_per_s']:>9.0f} {100 * r['efficiency']:>5.1f}%")
    res = {"assumptions": assumptions, "inputs": inp, "args": {k: v for k, v in vars(args).items() if k != "worker"},
           "curve": main, "curves": curves}
    json_path = args.json or os.path.join(args.out_dir, "scaling_model.json")
    png = os.path.splitext(json_path)[0] + ".png"
    write_json(json_path, res)
    plot(curves, f"ZeRO-2 weak scaling, effective batch {args.global_batch}, "
                 f"{inp['params'] / 1e6:.0f} M params, {inp['step_s'] * 1e3:.0f} ms / {inp['micro_batch']} img",
         png)
    print(f"wrote {json_path}, {png}")
    return res


# ------------------------------------------------------------------ 1 vs 2 gloo ranks on this CPU
def worker(args) -> None:
    """torchrun child: tiny MFF through our ZeRO-2 engine, same per-rank micro batch; plus raw collectives."""
    import statistics
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from mff_ds.engine.distributed import init_distributed
    from throughput import TINY, TINY_MFF_LEVELS, build_ours
    from deepspeed.utils import logger as ds_logger
    from mff_ds.data import normalize
    from mff_ds.models import resolve_config

    ds_logger.setLevel("WARNING")
    env = init_distributed()
    device = torch.device("cpu")
    cfg = resolve_config("mff_vit_tiny_patch16", **TINY, out_indices=TINY_MFF_LEVELS, kernels="torch")
    ns = SimpleNamespace(micro_batch=16, seed=0, optimizer="torch", compile=False, engine="deepspeed", zero_stage=2)
    t = build_ours(cfg, ns, device, "fp32", world_size=env.world_size)
    g = torch.Generator().manual_seed(env.rank)
    x = normalize(torch.randint(0, 256, (16, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8, generator=g))
    for _ in range(3):
        t.step(x)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        t.step(x)
        times.append(time.perf_counter() - t0)
    # raw collectives on the gradient-sized buffer: all-reduce (= reduce-scatter + all-gather) and all-gather
    n = env.world_size
    buf = torch.randn(t.n_params)
    part = torch.randn(math.ceil(t.n_params / n))
    ar, ag = [], []
    for i in range(args.steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        t1 = time.perf_counter()
        dist.all_gather([torch.empty_like(part) for _ in range(n)], part)
        t2 = time.perf_counter()
        if i >= 2:
            ar.append(t1 - t0)
            ag.append(t2 - t1)
    out = {"world_size": n, "step_s": statistics.median(times), "step_s_all": times,
           "allreduce_s": statistics.median(ar), "allgather_s": statistics.median(ag), "params": t.n_params,
           "micro_batch": 16, "model": f"tiny MFF {cfg.embed_dim}-d x {cfg.depth}, {cfg.img_size} px"}
    all_out = [None] * n
    dist.all_gather_object(all_out, out)
    if env.rank == 0:
        out["step_s_per_rank"] = [o["step_s"] for o in all_out]
        out["step_s"] = max(out["step_s_per_rank"])
        write_json(args.worker, out)
    dist.barrier()


def measure_cpu(args) -> dict:
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", MFF_DS_LOG_LEVEL="WARNING")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = os.path.join(tmp, f"w{n}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                   "--nproc_per_node", str(n), os.path.abspath(__file__), "--worker", out, "--steps", str(args.steps)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if p.returncode != 0 or not os.path.exists(out):
                raise SystemExit(f"--measure-cpu: {n}-rank run failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            with open(out) as f:
                results[n] = json.load(f)
            results[n]["wall_s"] = time.perf_counter() - t0
    r1, r2 = results[1], results[2]
    nbytes = r2["params"] * 4
    ar_busbw = 2 * (2 - 1) / 2 * nbytes / r2["allreduce_s"] / 1e9  # nccl-tests bus bandwidth convention
    overhead = r2["step_s"] / r1["step_s"] - 1
    # what the analytic model predicts for 2 ranks with the bandwidth measured here (no overlap)
    pred = step_model(2, step_s=r1["step_s"], micro_batch=16, params=r2["params"], grad_bytes=4, param_bytes=4,
                      global_batch=32, gpus_per_node=2, intra_gbps=ar_busbw, inter_gbps=ar_busbw,
                      intra_latency_us=0.0, inter_latency_us=0.0, overlap=0.0)
    res = {"model": r1["model"], "params": r1["params"], "micro_batch_per_rank": 16, "precision": "fp32",
           "step_ms_1rank": 1e3 * r1["step_s"], "step_ms_2ranks": 1e3 * r2["step_s"],
           "comm_overhead": overhead, "allreduce_ms": 1e3 * r2["allreduce_s"], "allgather_ms": 1e3 * r2["allgather_s"],
           "gloo_allreduce_busbw_gbps": ar_busbw,
           "model_predicted_overhead": pred["step_s"] / (pred["compute_s"]) - 1,
           "comm_share_of_2rank_step": (r2["allreduce_s"] + r2["allgather_s"]) / r2["step_s"],
           "note": "2 ranks x 1 thread on a shared 2-core machine: the overhead also holds any contention for cores "
                   "and memory bandwidth between the two ranks, not only gloo communication",
           "runs": results}
    print(f"CPU, gloo, {r1['model']} ({r1['params'] / 1e6:.2f} M params), micro batch 16 per rank, fp32, ZeRO-2:\n"
          f"  1 rank: {res['step_ms_1rank']:.1f} ms/step   2 ranks: {res['step_ms_2ranks']:.1f} ms/step   "
          f"-> overhead {100 * overhead:+.1f}%\n"
          f"  gloo all-reduce of the gradients: {res['allreduce_ms']:.2f} ms (bus bandwidth {ar_busbw:.2f} GB/s), "
          f"all-gather of the parameters: {res['allgather_ms']:.2f} ms\n"
          f"  = {100 * res['comm_share_of_2rank_step']:.0f}% of the 2-rank step; the analytic model with that bandwidth "
          f"predicts {100 * res['model_predicted_overhead']:+.1f}%; the rest of the measured overhead is the two ranks "
          f"sharing the cores")
    json_path = args.json or os.path.join(args.out_dir, "scaling_cpu_measured.json")
    write_json(json_path, res)
    print(f"wrote {json_path}")
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.measure_cpu:
        return measure_cpu(args)
    if args.paths:
        return paths_main(args)
    return model_main(args)


if __name__ == "__main__":
    main()
