"""Host overhead of each DeepSpeed path against torch DDP, on several ranks: the multi-rank proxy for the GPU.

    python benchmarks/ddp_overhead.py                     # 2 CPU ranks (gloo), bf16, 30 alternating steps
    python benchmarks/ddp_overhead.py --world 1           # one rank: DDP is then a plain loop

Every rank builds the same trainers on MFF with ViT-B's parameter layout at tiny widths (throughput.py's
`--preset overhead` model: 265 tensors, compute negligible, so a step is framework work plus collectives):
- `zero2`: our engine with ZeRO-2 as engine_defaults configures it (several ranks: overlap_comm and contiguous
  gradients, i.e. a DeepSpeed gradient hook on every parameter);
- `zero1`: ZeRO-1 without gradient hooks (overlap_comm and contiguous_gradients off: one reduce after the last
  backward of the step);
- the same two with `precision: amp-bf16` (fp32 weights, bf16 autocast), with --amp;
- `ddp`: torch DistributedDataParallel + fused AdamW under bf16 autocast, what a user would write instead.
The timed steps alternate trainer by trainer (a barrier before each), so drifts hit all alike. Reported per trainer:
median step ms, the paired median ratio to DDP's step, and for ours the ms per step spent inside torch.distributed
collectives (timed by wrapping them) and the host time apart from them. DDP's reducer runs its all-reduce from C++,
out of reach of the wrapper, so its row has no split.

Output: <out-dir>/ddp_overhead_w<N>.json and .md.
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from mff_ds.common import write_json, write_text  # noqa: E402

COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "reduce_scatter",
               "broadcast", "reduce", "all_to_all_single")


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2, help="ranks (gloo on CPU)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="our engine's weights")
    p.add_argument("--amp", action="store_true", help="also ZeRO-1 / ZeRO-2 with precision amp-bf16")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank: write results here
    a = p.parse_args(argv)
    for name in ("world", "micro_batch", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(a, name)}")
    return a


class CollectiveClock:
    """Seconds spent inside torch.distributed's collectives (DeepSpeed calls them through deepspeed.comm)."""

    def __init__(self):
        import torch.distributed as dist
        self.seconds, self.dist = 0.0, dist
        for name in COLLECTIVES:
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
        return wrapper


def build_ddp(cfg, micro_batch: int, seed: int):
    """torch DDP + fused AdamW, bf16 autocast, fp32 weights."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mff_ds.models import build_model
    torch.manual_seed(seed)
    model = build_model(cfg)
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ddp(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def worker(a) -> None:
    import torch
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    from mff_ds.data import normalize
    from mff_ds.engine.distributed import init_distributed
    from mff_ds.models import resolve_config
    from throughput import OVERHEAD, build_ours

    ds_logger.setLevel("WARNING")
    env = init_distributed()
    device = torch.device("cpu")
    cfg = resolve_config("mff_vit_base_patch16", **OVERHEAD, kernels="torch")
    candidates = [("zero2", 2, a.precision), ("zero1", 1, a.precision)]
    if a.amp:
        candidates += [("zero2 amp-bf16", 2, "amp-bf16"), ("zero1 amp-bf16", 1, "amp-bf16")]
    steps = {}
    for name, stage, precision in candidates:
        ns = SimpleNamespace(micro_batch=a.micro_batch, seed=0, compile=False, engine="deepspeed", zero_stage=stage)
        steps[name] = build_ours(cfg, ns, device, precision, world_size=env.world_size).step
    steps["ddp"] = build_ddp(cfg, a.micro_batch, 0)
    g = torch.Generator().manual_seed(env.rank)
    x = normalize(torch.randint(0, 256, (a.micro_batch, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                                generator=g))
    xs = {"bf16": x.to(torch.bfloat16), "fp32": x, "amp-bf16": x}
    dtype_of = {name: precision for name, _, precision in candidates}
    dtype_of["ddp"] = "fp32"
    clock = CollectiveClock()
    times = {n: [] for n in steps}
    comm = {n: [] for n in steps}
    for i in range(a.warmup + a.steps):
        for name, step in steps.items():
            dist.barrier()
            c0, t0 = clock.seconds, time.perf_counter()
            step(xs[dtype_of[name]])
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
                comm[name].append(clock.seconds - c0)
    out = {"times": times, "comm": comm}
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, out)
    if env.rank == 0:
        from mff_ds.models import build_model
        write_json(a.worker, {"ranks": everyone, "model_tensors": sum(1 for _ in build_model(cfg).parameters())})
    dist.barrier()


def summarize(a, ranks: list) -> dict:
    """Per trainer: a step lasts as long as its slowest rank; ratios paired step by step against DDP."""
    names = list(ranks[0]["times"])
    step = {n: [max(r["times"][n][i] for r in ranks) for i in range(a.steps)] for n in names}
    comm = {n: [max(r["comm"][n][i] for r in ranks) for i in range(a.steps)] for n in names}
    rows = {}
    for n in names:
        rows[n] = {"step_ms": 1e3 * statistics.median(step[n]),
                   "ratio_to_ddp": statistics.median(s / d for s, d in zip(step[n], step["ddp"])),
                   "collective_ms": None if n == "ddp" else 1e3 * statistics.median(comm[n]),
                   "host_ms_apart_from_collectives": None if n == "ddp" else
                   1e3 * statistics.median(s - c for s, c in zip(step[n], comm[n]))}
    return rows


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    env = dict(os.environ, OMP_NUM_THREADS="1", MFF_DS_LOG_LEVEL="WARNING")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.world),
               os.path.abspath(__file__), *argv, "--worker", out]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0 or not os.path.exists(out):
            raise SystemExit(f"ddp_overhead: the {a.world}-rank run failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        with open(out) as f:
            raw = json.load(f)
    rows = summarize(a, raw["ranks"])
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/ddp_overhead.py " + " ".join(shlex.quote(x) for x in argv),
           "device": f"CPU, {a.world} rank(s) x 1 thread, gloo", "world": a.world, "precision": a.precision,
           "micro_batch": a.micro_batch, "steps": a.steps, "model_tensors": raw["model_tensors"], "rows": rows,
           "raw": raw["ranks"]}
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    md = [f"**{res['device']}**, {res['date']}: MFF with ViT-B's layout ({raw['model_tensors']} tensors) at tiny "
          f"widths, micro batch {a.micro_batch} per rank, {a.precision}, {a.steps} alternating steps.", "",
          "| trainer | step ms (median) | / DDP (paired median) | collectives ms | host ms apart from them |",
          "|---|---:|---:|---:|---:|"]
    md += [f"| {n} | {r['step_ms']:.1f} | {r['ratio_to_ddp']:.2f} | {fmt(r['collective_ms'])} | "
           f"{fmt(r['host_ms_apart_from_collectives'])} |" for n, r in rows.items()]
    md += ["", f"Command: `{res['command']}`", ""]
    stem = os.path.join(a.out_dir, f"ddp_overhead_w{a.world}")
    write_json(stem + ".json", res)
    write_text(stem + ".md", "\n".join(md))
    print("\n".join(md))
    print(f"wrote {stem}.json, {stem}.md")
    return res


if __name__ == "__main__":
    main()
