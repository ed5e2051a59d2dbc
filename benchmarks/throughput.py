"""Training throughput: MFF vs plain MAE through our DeepSpeed engine, and the standard MAE baseline.

    python benchmarks/throughput.py                      # CUDA: ViT-B/16, 224 px, bf16, micro batch 256
    python benchmarks/throughput.py --device cpu         # CPU: a tiny model (--preset tiny), about 20 s
    python benchmarks/throughput.py --device cpu --preset overhead   # host ms/step: engine vs plain loop, syncs
    python benchmarks/throughput.py --device cpu --precisions bf16,amp-bf16   # MFF step time per precision

Three trainers live in one process: MFF and plain MAE, each built like pretraining builds it (recipe ->
build_ds_config -> DeepSpeed engine (ZeRO-1 without hooks, the ViT-S/B recipes' path; --zero-stage 2, --deepcompile)
-> engine.optim.build_deepspeed_engine, torch's fused AdamW), and the
official facebookresearch/mae loop
(benchmarks/mae_baseline.py). Each is warmed up (--warmup steps, not timed), then the timed steps alternate
MFF, MAE, baseline, MFF, ... so drifts of clock or load hit all three alike. A step = forward + backward +
optimizer step on one micro batch (no accumulation), timed between device synchronisations, on synthetic
inputs already on the device (--data PATH: batches come from our data pipeline and their wait is timed too;
then the MFF trainer is timed again on synthetic inputs: `mff_synthetic`, `real_over_synthetic` in the JSON).

Reported per trainer: img/s = micro_batch / step time (median, IQR, min, max over the timed steps), median
step time, MFU and peak device memory; ratio_mff_over_mae = median over the alternation rounds of
t_MFF / t_MAE (paired, robust to drift); speedup_over_baseline = img/s ours / img/s baseline.

MFU = flops_per_image(cfg) x img/s / peak, where flops_per_image (mff_ds/models/flops.py) counts the matmuls
and attention products of forward + backward at 2 FLOPs per multiply-add (backward = 2x forward, the patch
embedding 1x), checked against torch's FlopCounterMode in tests/test_flops.py and tests/test_benchmarks.py;
peak = dense 16-bit tensor-core TFLOP/s from the device name (H100/H200: 989), or --peak-tflops; null on CPU
unless --peak-tflops is given. The baseline does the same work as our MAE, so it is credited the same FLOPs.

peak_mem_mb = the trainer's own persistent memory (weights, gradients, optimizer state; measured across its
warm-up) + the largest transient of its steps: what it would need alone. CUDA only (null on CPU).

host_syncs_per_step = sync points (tensor-to-Python conversions and device synchronizes, from DeepSpeed, torch
or our code; benchmarks/host_syncs.py) counted over one extra step of each trainer.

--preset overhead: MFF with ViT-B's parameter layout (12 + 8 blocks, 6 fused levels, 265 tensors) at tiny widths
(48-d encoder, 32-d decoder, 32 px, micro batch 2, bf16), so a step is almost all framework work on the host.
Trainers: our engine as the recipe configures it (configs/mff_vit-b_300e.yaml through build_ds_config, ZeRO-1
bf16), our plain loop (autocast, fused AdamW), and the same engine with DeepSpeed's default settings for the stage
(what engine_defaults replaces), timed alternately; reported: host ms per step of each, the paired ratios to the
plain loop (median over the alternation rounds), and the sync points per step. On CUDA, add
--profile N to get the device idle time per step.

--precisions P1,P2,...: MFF through our engine once per precision (fp32, bf16, fp16, amp-bf16, amp-fp16; the
fp16 ones need CUDA), timed alternately; one row each: img/s, step ms, the paired median step-time ratio to the
first precision listed, peak memory (CUDA). Output: <out-dir>/precisions_<device>.json and .md (or --json).

Output: --json (default <out-dir>/throughput_<device>.json), a markdown table and a PNG bar chart beside it.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from mff_ds.common import COMPUTE_DTYPES, DTYPES, atomic_write, write_json, write_text  # noqa: E402
from mff_ds.models import build_model, resolve_config  # noqa: E402
from mff_ds.models.archs import default_out_indices  # noqa: E402
from mff_ds.models.flops import flops_per_image  # noqa: E402

# CPU smoke size: 64 px, patch 8 (64 patches, 16 kept), 96-d x 6 blocks, MFF fuses blocks 1, 3, 5.
TINY = dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3, decoder_embed_dim=64, decoder_depth=2,
            decoder_num_heads=2)
TINY_MFF_LEVELS = [1, 3, 5]
# Host-overhead size: ViT-B's layout (depth, heads, decoder, fused levels) at widths where compute is negligible.
OVERHEAD = dict(img_size=32, patch_size=16, embed_dim=48, num_heads=12, decoder_embed_dim=32, decoder_num_heads=16)
ROLES = ("mff", "mae", "baseline_mae")
PRECISIONS = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")  # the recipe's, less auto (docs/ENGINE.md "Precision")
FP16 = ("fp16", "amp-fp16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="mff_vit_base_patch16",
                   help="MFF arch name (mff_vit_{tiny,small,base,large,huge}_patch{14,16}); MAE = the same with mae_")
    p.add_argument("--preset", choices=("auto", "tiny", "overhead", "none"), default="auto",
                   help="tiny: a small model for CPU smoke runs; auto: tiny on CPU, none on CUDA; overhead: ViT-B "
                        "layout at tiny widths, our engine vs our plain loop (host time and syncs per step)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override for both models, e.g. --set depth=4 (out_indices: MFF only)")
    p.add_argument("--img-size", type=int, default=None, help="default: 224 (the arch), 64 with --preset tiny")
    p.add_argument("--micro-batch", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--precisions", default=None, metavar="P1,P2,...",
                   help=f"compare MFF step time across precisions ({', '.join(PRECISIONS)}), one row each")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our models as the recipe's deepspeed.compile does (the baseline stays eager)")
    from mff_ds.engine.recipe import COMPILE_MODES
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode with --compile (as the recipe's deepspeed.compile_mode)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=1,
                   help="DeepSpeed ZeRO stage of our engine (1: the ViT-S/B recipes' ds_configs/zero1.json)")
    p.add_argument("--deepcompile", action="store_true",
                   help="DeepSpeed's DeepCompile (the recipe's deepspeed.deepcompile; CUDA only)")
    p.add_argument("--engine", choices=("deepspeed", "plain"), default="deepspeed",
                   help="plain: our model in an eager torch loop (autocast, fp32 weights, fused AdamW) to separate "
                        "the model's cost from the engine's")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N steps of each trainer and print the top ops")
    p.add_argument("--steps", type=int, default=20, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per trainer")
    p.add_argument("--no-baseline", action="store_true", help="skip the facebookresearch/mae baseline")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from the name)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="time with real batches: an ImageFolder root, WebDataset shards, or 'demo'")
    p.add_argument("--workers", type=int, default=8, help="data loader workers with --data")
    p.add_argument("--decode", choices=("auto", "gpu", "cpu"), default="auto",
                   help="data.decode with --data (auto: on the GPU where there is one)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.precisions is not None:
        args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
        bad = [x for x in args.precisions if x not in PRECISIONS]
        if bad or not args.precisions:
            p.error(f"--precisions: expected a comma-separated list of {', '.join(PRECISIONS)}, got {bad or '[]'}")
    for name in ("steps", "warmup", "micro_batch", "img_size", "workers"):
        v = getattr(args, name)
        lo = 0 if name in ("warmup", "workers") else 1
        if v is not None and v < lo:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= {lo}, got {v}")
    return args


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def model_configs(args, device):
    """(MFF ModelConfig, MAE ModelConfig) from --arch, --preset, --set, --img-size, --kernels."""
    if not args.arch.startswith("mff_"):
        raise SystemExit(f"--arch: expected an MFF arch name (mff_vit_<size>_patch<p>), got {args.arch!r}")
    over = {}
    if args.preset == "tiny" or (args.preset == "auto" and device.type == "cpu"):
        over.update(TINY, out_indices=TINY_MFF_LEVELS)
    elif args.preset == "overhead":
        over.update(OVERHEAD)
    for item in args.overrides:
        if "=" not in item:
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        over[k.strip()] = _parse_value(v.strip())
    if args.img_size is not None:
        over["img_size"] = args.img_size
    over["kernels"] = args.kernels
    mff_over = dict(over)
    if "depth" in over and "out_indices" not in over:
        mff_over["out_indices"] = default_out_indices(over["depth"])
    mae_over = dict(over, out_indices=[-1])  # the last block only
    try:
        mff = resolve_config(args.arch, **mff_over)
        mae = resolve_config("mae_" + args.arch[4:], **mae_over)
        mae = resolve_config(mae, out_indices=[mae.depth - 1])
    except ValueError as e:
        raise SystemExit(f"model options: {e}")
    if len(mff.levels) < 2:
        raise SystemExit(f"--set out_indices: MFF needs at least 2 fused levels, got {mff.out_indices}")
    return mff, mae


# ------------------------------------------------------------------ trainers
class Trainer:
    """A name, a step(batch) and what is needed to report on it."""

    def __init__(self, name, step, flops, n_params, optimizer, dtype):
        self.name, self.step, self.flops, self.n_params, self.optimizer, self.dtype = (
            name, step, flops, n_params, optimizer, dtype)
        self.times, self.transient, self.resident = [], 0, 0


def build_ours(cfg, args, device, precision, world_size=1):
    """Our pretraining path: recipe -> DeepSpeed config (ZeRO-1 unless --zero-stage) -> build_deepspeed_engine.
    One optimizer step per micro batch on every rank (global batch = micro batch x world size)."""
    from mff_ds.engine import ds_compat
    from mff_ds.engine.optim import build_deepspeed_engine, build_ds_config, precision_of
    from mff_ds.pretrain.recipe import from_dict

    m = args.micro_batch
    if args.engine == "plain":
        return build_plain(cfg, args, device, precision)
    recipe = from_dict({"precision": precision, "model": cfg.to_dict(),
                        "batch": {"global_batch": m * world_size, "micro_batch": m},
                        "deepspeed": {"config": f"ds_configs/zero{args.zero_stage}.json",
                                      "deepcompile": getattr(args, "deepcompile", False)}},
                       world_size=world_size, source="throughput")
    ds_config = build_ds_config(recipe, world_size, device)
    assert precision_of(ds_config) == precision
    stock = getattr(args, "stock", False)
    if stock:  # DeepSpeed's own defaults for the stage instead of engine_defaults (the overhead preset's "before")
        ds_config["zero_optimization"] = {"stage": args.zero_stage}
        ds_config.pop("timers")
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = model.param_groups(recipe.optim.weight_decay, decay_fusion_logits=recipe.optim.decay_fusion_logits)
    engine, opt = build_deepspeed_engine(model, groups, ds_config, lr=recipe.lr(), betas=recipe.optim.betas,
                                         eps=recipe.optim.eps, device=device)
    if stock:
        ds_compat.restore_view_refresh(engine.optimizer)  # DeepSpeed's own per-step view refresh again
    if args.compile or recipe.deepspeed.deepcompile:  # as Task.build_engine does
        engine.compile(compile_kwargs={"mode": args.compile_mode})

    def step(x):
        out = engine(x)
        engine.backward(out.loss)
        engine.step()

    name = ("MFF" if model.is_mff else "MAE") + (" compiled" if args.compile else "") + (" stock" if stock else "")
    name += " DeepCompile" if recipe.deepspeed.deepcompile else ""
    return Trainer(name, step, flops_per_image(cfg), n_params, type(opt).__name__ + "(fused=True)", DTYPES[precision])


def build_plain(cfg, args, device, precision):
    """Our model without DeepSpeed: fp32 weights, autocast to `precision`, torch's fused AdamW (as on CUDA, so
    the CPU host-time proxy compares like with like)."""
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    if args.compile:
        model.compile(mode=args.compile_mode)
    groups = model.param_groups(0.05)
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    amp = COMPUTE_DTYPES[precision] if precision != "fp32" else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision in FP16)

    def step(x):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = ("MFF" if model.is_mff else "MAE") + " (plain loop)" + (" compiled" if args.compile else "")
    return Trainer(name, step, flops_per_image(cfg), n_params, "AdamW(fused=True)", torch.float32)


def profile(trainers, inputs, steps, device) -> dict:
    """Print the top ops (device time, then host time) of `steps` steps of each trainer; on CUDA return each
    trainer's device idle ms per step (wall time minus the union of its kernels' intervals)."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    idle = {}
    for t in trainers:
        x = inputs.get(t.dtype)
        if cuda:
            torch.cuda.synchronize(device)
        with tprofile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                t.step(x)
            if cuda:
                torch.cuda.synchronize(device)
            wall_us = 1e6 * (time.perf_counter() - t0)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        print(f"--- profile: {t.name}, {steps} steps, {n_ops / steps:.0f} aten ops per step, by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))
        if cuda:
            busy = _union_us([(e.time_range.start, e.time_range.end) for e in prof.events()
                              if e.device_type.name == "CUDA"])
            idle[t.name] = max(wall_us - busy, 0.0) / 1e3 / steps
            print(f"--- {t.name}: device busy {busy / 1e3 / steps:.1f} ms, idle {idle[t.name]:.1f} ms per step")
    return idle


def _union_us(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def count_syncs(t: Trainer, inputs) -> int:
    """Host-device sync points of one step of `t` (benchmarks/host_syncs.py)."""
    from host_syncs import SyncCounter
    x = inputs.get(t.dtype)
    with SyncCounter() as c:
        t.step(x)
    return c.total


def build_official(cfg, args, device, precision):
    from mae_baseline import BaselineTrainer, build_baseline
    torch.manual_seed(args.seed)
    amp = {"amp-bf16": "bf16", "amp-fp16": "fp16"}.get(precision, precision)  # the official loop is autocast anyway
    t = BaselineTrainer(build_baseline(cfg), amp, device, mask_ratio=cfg.mask_ratio)
    n_params = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    return Trainer("MAE baseline", t.step, flops_per_image(cfg), n_params, "torch.optim.AdamW (foreach)", torch.float32)


# ------------------------------------------------------------------ inputs
class Inputs:
    """Synthetic normalised batches already on the device, or batches from build_loader (--data)."""

    def __init__(self, args, device, img_size, synthetic=False):
        from mff_ds.data import normalize
        self.normalize, self.device = normalize, device
        self.loader = self.it = None
        if args.data and not synthetic:
            from mff_ds.data import DataConfig, build_loader, source_for_path
            dc = DataConfig(source=source_for_path(args.data), path=args.data, num_workers=args.workers,
                            pin_memory=device.type == "cuda", decode=args.decode)
            self.loader = build_loader(dc, img_size=img_size, micro_batch=args.micro_batch, rank=0, world_size=1,
                                       seed=args.seed, epoch=0)
            self.epoch = 0
        else:
            g = torch.Generator().manual_seed(args.seed)
            u8 = torch.randint(0, 256, (args.micro_batch, 3, img_size, img_size), dtype=torch.uint8, generator=g)
            self.u8 = u8.to(device)
            self.cache = {}

    def get(self, dtype):
        if self.loader is None:
            if dtype not in self.cache:
                self.cache[dtype] = self.normalize(self.u8, dtype=dtype)
            return self.cache[dtype]
        while True:
            if self.it is None:
                self.loader.set_epoch(self.epoch)
                self.it = iter(self.loader)
            try:
                images, _ = next(self.it)
                return self.normalize(images.to(self.device, non_blocking=True), dtype=dtype)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1


# ------------------------------------------------------------------ timing and report
def _quantiles(xs):
    if len(xs) == 1:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarize(t: Trainer, batch: int, peak_tflops, cuda: bool) -> dict:
    ips = [batch / s for s in t.times]
    q1, q3 = _quantiles(ips)
    med = statistics.median(ips)
    return {"img_per_s": med, "img_per_s_iqr": q3 - q1, "img_per_s_q1": q1, "img_per_s_q3": q3,
            "img_per_s_min": min(ips), "img_per_s_max": max(ips),
            "step_ms": 1e3 * statistics.median(t.times),
            "mfu": t.flops * med / (peak_tflops * 1e12) if peak_tflops else None,
            "peak_mem_mb": (t.resident + t.transient) / 2**20 if cuda else None,
            "gflops_per_image": t.flops / 1e9, "params_m": t.n_params / 1e6, "optimizer": t.optimizer,
            "timed_steps": len(t.times)}


def warm_up(t: Trainer, inputs, warmup, device, before_build):
    """Untimed steps; the trainer's persistent memory (weights, grads, lazily created optimizer state) is what
    memory_allocated gained since just before it was built."""
    for _ in range(max(warmup, 1)):
        t.step(inputs.get(t.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t.resident = torch.cuda.memory_allocated(device) - before_build


def run(trainers, inputs, steps, device):
    """Timed steps, alternating the trainers; each step between two device synchronisations."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(steps):
        for t in trainers:
            x = inputs.get(t.dtype) if inputs.loader is None else None
            sync()
            if cuda:
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            t.step(x if x is not None else inputs.get(t.dtype))
            sync()
            t.times.append(time.perf_counter() - t0)
            if cuda:
                t.transient = max(t.transient, torch.cuda.max_memory_allocated(device) - base)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"



def markdown(res: dict) -> str:
    c = res["config"]
    lines = [f"**{res['device']}**, {res['date']}, {c['arch']} ({c['img_size']} px, patch {c['patch_size']}), "
             f"{c['model']}, micro batch {c['micro_batch']}, {c['precision']}, kernels {c['kernels']}, "
             f"compile {c['compile']}, {c['steps']} timed steps each after {c['warmup']} warm-up, "
             f"{'data ' + c['data'] if c['data'] else 'synthetic inputs on the device'}.",
             "",
             "| trainer | img/s (median) | IQR | step ms | MFU | peak mem MB | vs baseline | device idle ms/step "
             "| host syncs/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = res.get("baseline_mae")
    how = "plain torch loop" if c.get("engine") == "plain" else f"DeepSpeed ZeRO-{c.get('zero_stage', 2)}"
    how += ", DeepCompile" if c.get("deepcompile") else ""
    how += ", compiled" if c.get("compile") else ""
    for role, label in (("mff", f"MFF (ours, {how})"), ("mae", f"MAE (ours, {how})"),
                        ("baseline_mae", "MAE (facebookresearch/mae loop)")):
        r = res.get(role)
        if not r:
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "n/a"
        vs = f"{r['img_per_s'] / base['img_per_s']:.2f}x" if base else "n/a"
        idle = r.get("device_idle_ms_per_step")
        lines.append(f"| {label} | {r['img_per_s']:.1f} | {r['img_per_s_iqr']:.1f} | {r['step_ms']:.1f} | {mfu} "
                     f"| {mem} | {vs} | {'n/a' if idle is None else f'{idle:.1f}'} | {r.get('host_syncs_per_step')} |")
    lines += ["", f"MFF / MAE step-time ratio: **{res['ratio_mff_over_mae']:.3f}**"
              + (f"; our MAE over the baseline: **{res['speedup_over_baseline']:.2f}x**, our MFF: "
                 f"**{res['speedup_mff_over_baseline']:.2f}x**" if base else ""),
              "", f"Command: `{res['command']}`", ""]
    if res.get("mff_synthetic"):
        lines[-3:-3] = ["", f"MFF with real data: **{res['mff']['img_per_s']:.1f}** img/s; on synthetic inputs on the "
                        f"device: {res['mff_synthetic']['img_per_s']:.1f} img/s; real / synthetic "
                        f"**{res['real_over_synthetic']:.3f}** (data.decode={c.get('decode')})."]
    return "\n".join(lines)


def chart(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    roles = [r for r in ROLES if res.get(r)]
    labels = {"mff": "MFF (ours)", "mae": "MAE (ours)", "baseline_mae": "MAE (official loop)"}
    vals = [res[r]["img_per_s"] for r in roles]
    err = [[res[r]["img_per_s"] - res[r]["img_per_s_q1"] for r in roles],
           [res[r]["img_per_s_q3"] - res[r]["img_per_s"] for r in roles]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar([labels[r] for r in roles], vals, yerr=err, capsize=4,
                  color=["#1f77b4", "#6baed6", "#bdbdbd"][:len(roles)])
    for b, v, r in zip(bars, vals, roles):
        ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, res[r]["img_per_s_q3"]), ha="center",
                    va="bottom", xytext=(0, 3), textcoords="offset points")
    ax.margins(y=0.15)
    c = res["config"]
    ax.set_ylabel("images / s (median, IQR bars)")
    ax.set_title(f"{res['device']}\n{c['arch']} {c['img_size']}px, batch {c['micro_batch']}, {c['precision']}",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def overhead(args, device, cfg, argv) -> dict:
    """--preset overhead: our engine as configured vs our plain loop on the same model, alternating; host ms per
    step (on CPU the step time is host time; on CUDA at these widths it is too), paired ratio, syncs per step."""
    import argparse as _argparse
    inputs = Inputs(args, device, cfg.img_size)
    trainers = []
    for engine, stock in (("deepspeed", False), ("plain", False), ("deepspeed", True)):
        a = _argparse.Namespace(**dict(vars(args), engine=engine, stock=stock))
        t = build_ours(cfg, a, device, args.precision)
        warm_up(t, inputs, args.warmup, device, 0)
        trainers.append(t)
    run(trainers, inputs, args.steps, device)
    idle = profile(trainers, inputs, args.profile, device) if args.profile else {}
    res = {"preset": "overhead", "device": device_name(device),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in argv),
           "config": {"model": cfg.to_dict(), "micro_batch": args.micro_batch, "precision": args.precision,
                      "zero_stage": args.zero_stage, "steps": args.steps, "warmup": args.warmup,
                      "n_param_tensors": sum(1 for _ in build_model(cfg).parameters()), "torch": torch.__version__}}
    for role, t in zip(("engine", "plain", "engine_stock"), trainers):
        res[role] = {"name": t.name, "host_ms_per_step": 1e3 * statistics.median(t.times),
                     "host_ms_q1_q3": [1e3 * q for q in _quantiles(t.times)],
                     "host_syncs_per_step": count_syncs(t, inputs), "device_idle_ms_per_step": idle.get(t.name)}
    e, pl, st = trainers
    res["ratio_engine_over_plain"] = statistics.median(a / b for a, b in zip(e.times, pl.times))
    res["ratio_stock_engine_over_plain"] = statistics.median(a / b for a, b in zip(st.times, pl.times))
    md = "\n".join([
        f"**{res['device']}**, {res['date']}: MFF with ViT-B's layout ({res['config']['n_param_tensors']} parameter "
        f"tensors) at tiny widths, micro batch {args.micro_batch}, {args.precision}, {args.steps} alternating steps.",
        "", "| trainer | host ms / step (median) | syncs / step |", "|---|---:|---:|",
        f"| our DeepSpeed engine (ZeRO-{args.zero_stage}, as configured) | {res['engine']['host_ms_per_step']:.1f} "
        f"| {res['engine']['host_syncs_per_step']} |",
        f"| our plain loop (autocast, fused AdamW) | {res['plain']['host_ms_per_step']:.1f} "
        f"| {res['plain']['host_syncs_per_step']} |",
        f"| the same engine with DeepSpeed's default ZeRO-{args.zero_stage} settings | "
        f"{res['engine_stock']['host_ms_per_step']:.1f} | {res['engine_stock']['host_syncs_per_step']} |",
        "", f"engine / plain host time (paired median): **{res['ratio_engine_over_plain']:.2f}**; with DeepSpeed's "
        f"defaults: {res['ratio_stock_engine_over_plain']:.2f}", "",
        f"Command: `{res['command']}`", ""])
    return write_report(args, res, md, f"overhead_{device.type}")


def write_report(args, res: dict, md: str, default_stem: str) -> dict:
    """res as JSON and md as Markdown, at --json's stem or OUT_DIR/default_stem; prints md. Returns res."""
    stem = args.json[:-5] if args.json and args.json.endswith(".json") else os.path.join(args.out_dir, default_stem)
    write_json(stem + ".json", res)
    write_text(stem + ".md", md)
    print(md)
    print(f"wrote {stem}.json, {stem}.md", flush=True)
    return res


def compare_precisions(args, device, cfg, argv) -> dict:
    """--precisions: MFF through our engine in each precision, timed alternately (drift hits all alike); the
    paired median step-time ratio of each to the first listed, and each one's memory (CUDA)."""
    cuda = device.type == "cuda"
    mem = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    inputs = Inputs(args, device, cfg.img_size)
    trainers = []
    for prec in args.precisions:
        before = mem()
        t = build_ours(cfg, args, device, prec)
        warm_up(t, inputs, args.warmup, device, before)
        trainers.append(t)
    run(trainers, inputs, args.steps, device)
    first = trainers[0].times
    rows = []
    for prec, t in zip(args.precisions, trainers):
        r = summarize(t, args.micro_batch, None, cuda)
        rows.append({"precision": prec, "weights": str(DTYPES[prec]).replace("torch.", ""),
                     "compute": str(COMPUTE_DTYPES[prec]).replace("torch.", ""), "img_per_s": r["img_per_s"],
                     "step_ms": r["step_ms"], "peak_mem_mb": r["peak_mem_mb"],
                     "resident_mem_mb": t.resident / 2**20 if cuda else None,
                     f"ratio_over_{args.precisions[0]}": statistics.median(a / b for a, b in zip(t.times, first))})
    res = {"preset": "precisions", "device": device_name(device),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in argv),
           "config": {"model": cfg.to_dict(), "micro_batch": args.micro_batch, "zero_stage": args.zero_stage,
                      "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__}, "rows": rows}
    ref = args.precisions[0]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    md = "\n".join([
        f"**{res['device']}**, {res['date']}: MFF ({cfg.embed_dim}-d x {cfg.depth}, {cfg.img_size} px), our engine "
        f"(ZeRO-{args.zero_stage}), micro batch {args.micro_batch}, {args.steps} alternating steps per precision.",
        "", f"| precision | weights | compute | img/s (median) | step ms | step time / {ref} (paired median) "
        "| resident MB | peak MB |", "|---|---|---|---:|---:|---:|---:|---:|",
        *[f"| {r['precision']} | {r['weights']} | {r['compute']} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} "
          f"| {r[f'ratio_over_{ref}']:.3f} | {fmt(r['resident_mem_mb'], '.0f')} | {fmt(r['peak_mem_mb'], '.0f')} |"
          for r in rows],
        "", f"Command: `{res['command']}`", ""])
    return write_report(args, res, md, f"precisions_{device.type}")


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device: expected cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    cuda = device.type == "cuda"
    over = args.preset == "overhead"
    args.precision = args.precision or ("bf16" if cuda or over else "fp32")
    args.micro_batch = args.micro_batch or (2 if over else 256 if cuda else 16)
    for prec in [args.precision] + (args.precisions or []):
        if prec in FP16 and not cuda:
            raise SystemExit(f"--precision {prec}: needs a CUDA device (dynamic loss scaling); use fp32, bf16 or "
                             f"amp-bf16 on CPU")
    if args.kernels == "triton" and not cuda:
        raise SystemExit("--kernels triton: needs a CUDA device; use torch or auto on CPU")
    mff_cfg, mae_cfg = model_configs(args, device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.environ.setdefault("MFF_DS_LOG_LEVEL", "WARNING")
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(os.environ["MFF_DS_LOG_LEVEL"])
    from mff_ds.engine.distributed import init_distributed
    from mff_ds.models.flops import peak_tflops
    if not cuda:
        os.environ.setdefault("LOCAL_RANK", "0")
    init_distributed()
    if cuda:
        torch.cuda.set_device(device)  # after init_distributed (which picks LOCAL_RANK's device)

    if over:
        return overhead(args, device, mff_cfg, argv)
    if args.precisions:
        return compare_precisions(args, device, mff_cfg, argv)
    t_setup = time.perf_counter()
    mem = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    inputs = Inputs(args, device, mff_cfg.img_size)
    builds = [(build_ours, mff_cfg), (build_ours, mae_cfg)] + ([] if args.no_baseline else [(build_official, mae_cfg)])
    if inputs.loader is None:  # the synthetic batches exist before any trainer is measured
        for dtype in {torch.float32, DTYPES[args.precision]}:
            inputs.get(dtype)
    trainers = []
    for build, cfg in builds:  # build + warm up one after the other (memory attribution)
        before = mem()
        t = build(cfg, args, device, args.precision)
        warm_up(t, inputs, args.warmup, device, before)
        trainers.append(t)
    setup_s = time.perf_counter() - t_setup
    t_run = time.perf_counter()
    run(trainers, inputs, args.steps, device)
    run_s = time.perf_counter() - t_run
    synthetic = None
    if inputs.loader is not None:  # the same MFF trainer on synthetic inputs: is the real run fed?
        synthetic = copy.copy(trainers[0])
        synthetic.times = []
        run([synthetic], Inputs(args, device, mff_cfg.img_size, synthetic=True), args.steps, device)

    idle = profile(trainers, inputs, args.profile, device) if args.profile else {}
    peak = peak_tflops(device, args.peak_tflops)
    res = {}
    for role, t in zip(ROLES, trainers):
        res[role] = summarize(t, args.micro_batch, peak, cuda)
        res[role]["host_syncs_per_step"] = count_syncs(t, inputs)
        res[role]["device_idle_ms_per_step"] = idle.get(t.name)
    if synthetic is not None:
        res["mff_synthetic"] = summarize(synthetic, args.micro_batch, peak, cuda)
        res["real_over_synthetic"] = res["mff"]["img_per_s"] / res["mff_synthetic"]["img_per_s"]
    mff_t, mae_t = trainers[0].times, trainers[1].times
    res["ratio_mff_over_mae"] = statistics.median(a / b for a, b in zip(mff_t, mae_t))
    res["ratio_mff_over_mae_of_medians"] = res["mff"]["step_ms"] / res["mae"]["step_ms"]
    if not args.no_baseline:
        b = res["baseline_mae"]["img_per_s"]
        res["speedup_over_baseline"] = res["mae"]["img_per_s"] / b
        res["speedup_mff_over_baseline"] = res["mff"]["img_per_s"] / b
        for role in ("mff", "mae"):
            res[role]["speedup_over_baseline"] = res[role]["img_per_s"] / b
    else:
        res["speedup_over_baseline"] = res["speedup_mff_over_baseline"] = None
    tiny = args.preset == "tiny" or (args.preset == "auto" and not cuda)
    size = (f"ViT {mff_cfg.embed_dim}-d x {mff_cfg.depth}, decoder {mff_cfg.decoder_embed_dim}-d x "
            f"{mff_cfg.decoder_depth}, MFF levels {mff_cfg.levels}")
    res["config"] = {"arch": args.arch + (" (tiny preset)" if tiny else "") + (" + " + " ".join(args.overrides) if args.overrides else ""),
                     "model": size, "img_size": mff_cfg.img_size, "patch_size": mff_cfg.patch_size,
                     "micro_batch": args.micro_batch, "precision": args.precision, "kernels": args.kernels,
                     "compile": args.compile, "steps": args.steps, "warmup": args.warmup, "data": args.data,
                     "decode": args.decode if args.data else None, "workers": args.workers if args.data else None,
                     "peak_tflops": peak, "engine": args.engine,
                     "zero_stage": args.zero_stage if args.engine == "deepspeed" else None,
                     "deepcompile": args.deepcompile, "mff_model": mff_cfg.to_dict(),
                     "mae_model": mae_cfg.to_dict(), "optimizer": res["mff"]["optimizer"],
                     "setup_and_warmup_s": setup_s, "run_s": run_s, "torch": torch.__version__}
    res["device"] = device_name(device)
    res["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["command"] = "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in argv)

    stem = os.path.join(args.out_dir, f"throughput_{device.type}")
    json_path = args.json or stem + ".json"
    base = os.path.splitext(json_path)[0] if args.json else stem

    write_json(json_path, res)
    md = markdown(res)
    write_text(base + ".md", md)
    chart(res, base + ".png")
    print(md)
    print(f"wrote {json_path}, {base}.md, {base}.png", flush=True)
    return res


if __name__ == "__main__":
    main()
