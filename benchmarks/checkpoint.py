"""What a checkpoint costs the training loop: synchronous vs asynchronous saves (checkpoint.async), ViT-B and ViT-L.

Each configuration runs the shipped pretraining recipe (configs/mff_vit-b_300e.yaml, mff_vit-l_800e.yaml) through the
real loop (mff_ds.pretrain.task.train, ZeRO-1 as shipped) on synthetic data, in a process of its own, twice: with a
save every `--every` steps (ViT-B: every step; ViT-L: every 2, its write outlasting one step of batch 2 here) and with
only the final save. Reported per configuration:

- pause_per_save_s: (the loop's wall time with the saves - with the final save only) / (saves - 1), the loop
  timed from the end of its first step (start-up, which varies by seconds, left out): what a save costs the loop,
  all effects included (the snapshot, waiting for the previous save, the background thread's share of the CPU).
  This is the issue's acceptance measure; `--repeats` runs each pair again, alternating the modes, for medians.
- stall_s: the loop's own pause per save as it records it (metrics "checkpoints": the snapshot, or the whole write),
  write_s: from the start of the write to the completion marker, MiB/s = bytes / write_s, bytes per save (all files).
Medians over the saves (the final save, which waits for its write, excluded), and the ratios sync / async.

  OMP_NUM_THREADS=1 python benchmarks/checkpoint.py --engines            # ViT-B and ViT-L, both modes, ~30 min on 2 cores
  OMP_NUM_THREADS=1 python benchmarks/checkpoint.py --archs vit-b --steps 6 --out-dir /tmp/ckpt
  OMP_NUM_THREADS=1 python benchmarks/checkpoint.py --archs vit-b --run-dir /mnt/nfs_rw/ckpt --disk "sshfs ..."   # a network filesystem

`--engines` adds the comparison of the alternatives on the same ViT-B engine state (no training loop): DeepSpeed's
DecoupledCheckpointEngine (a spawned writer process fed through a queue) and torch.distributed.checkpoint's async_save
(its own file layout), next to our synchronous and asynchronous paths (docs/PERFORMANCE.md, "Checkpoints").
Results: <out-dir>/checkpoint.json and checkpoint.md, with the machine and the command.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"vit-b": "mff_vit-b_300e", "vit-l": "mff_vit-l_800e"}


def one(config: str, mode: str, every: int, steps: int, batch: int, out: str) -> dict:
    """One run in this process -> {wall_s, checkpoints, step_time}."""
    sys.path.insert(0, REPO)
    from mff_ds.pretrain.recipe import load_recipe
    from mff_ds.pretrain.task import train
    overrides = ["data.source=synthetic", f"data.num_samples={batch * (steps + 1)}", "data.num_workers=0",
                 f"batch.global_batch={batch}", f"batch.micro_batch={batch}", f"checkpoint.every_steps={every}",
                 f"checkpoint.async={str(mode == 'async').lower()}", "checkpoint.keep_last=2",
                 "checkpoint.export=false", "logging.every_steps=1", "logging.image_every_steps=0",
                 "logging.tensorboard=false", "logging.progress_bar=false", "schedule.epochs=1",
                 "schedule.warmup_epochs=0"]
    from mff_ds.engine import trainer
    recipe = load_recipe(CONFIGS[config], overrides, world_size=1)
    first = []  # the end of the first optimizer step: the loop's time is counted from there (start-up excluded)
    report = trainer.report_startup
    trainer.report_startup = lambda s: (first.append(time.perf_counter()), report(s))
    t = time.perf_counter()
    summary = train(recipe, out, max_steps=steps, resume="none")
    end = time.perf_counter()
    wall = end - t
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    startup = next(m["startup"] for m in lines if "startup" in m)
    return {"wall_s": wall, "loop_s": end - first[0], "startup_s": startup["phases"],
            "checkpoints": summary["checkpoints"],
            "step_time": statistics.median(m["step_time"] for m in lines if "step_time" in m)}


def per_arch(option: str, arch: str) -> str:
    """'vit-b=8,vit-l=2' -> the value for arch; a plain '8' for every arch."""
    return dict(kv.split("=") for kv in option.split(","))[arch] if "=" in option else option


def batch_of(args, arch) -> int:
    return int(per_arch(args.batch, arch))


def run_one(args, config, mode, every, root) -> dict:
    out = os.path.join(root, f"{config}_{mode}_{every}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--one", config, mode, str(every), "--steps", str(args.steps),
           "--batch", str(batch_of(args, config)), "--out-dir", out]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    if p.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return res


def summarize(saves: list, pair: dict, steps: int) -> dict:
    body = [c for c in saves if c["step"] != steps] or saves  # the final save waits for its own write
    med = lambda k: statistics.median(c[k] for c in body)  # noqa: E731
    return {"pause_per_save_s": (pair["every"]["loop_s"] - pair["final"]["loop_s"]) / max(len(saves) - 1, 1),
            "stall_s": med("stall_s"), "write_s": med("write_s"), "bytes": med("bytes"),
            "mib_per_s": med("bytes") / med("write_s") / 2**20, "saves": len(saves),
            "step_time_s": pair["final"]["step_time"], "stall_s_each": [round(c["stall_s"], 3) for c in saves],
            "write_s_each": [round(c["write_s"], 3) for c in saves]}


# ------------------------------------------------------------------ the alternatives, on one engine state
def engines(args) -> dict:
    """Our sync / async paths, DeepSpeed's DecoupledCheckpointEngine and torch DCP async_save on the ViT-B state."""
    sys.path.insert(0, REPO)
    import torch
    import deepspeed
    from mff_ds.engine import checkpoint as ckpt
    from mff_ds.engine.distributed import init_distributed
    from mff_ds.models import build_model
    init_distributed()
    ds_base = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}

    def engine_with(extra):
        torch.manual_seed(0)
        model = build_model(args.engine_arch)
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={**ds_base, **extra})
        x = torch.randint(0, 255, (1, 3, 224, 224)).float()
        eng.backward(eng(x).loss)
        eng.step()
        return eng, x

    root = tempfile.mkdtemp(dir=args.run_dir or args.out_dir)
    out = {}
    eng, x = engine_with({})
    for name, saver in (("ours_sync", None), ("ours_async", ckpt.AsyncSaver(eng, 1, torch.device("cpu"), 600))):
        stalls, writes = [], []
        for i in range(args.engine_saves + 1):
            stats = {}
            t = time.perf_counter()
            ckpt.save(eng, os.path.join(root, name), i, {}, {"compat": {}}, 1, saver=saver, stats=stats)
            stalls.append(time.perf_counter() - t)
            if saver is not None:
                saver.wait("the benchmark")
            writes.append(stats["write_s"])
        out[name] = {"stall_s": statistics.median(stalls[1:]), "write_s": statistics.median(writes[1:])}
    del eng
    # DeepSpeed's decoupled engine: save_checkpoint() queues the live state to a spawned writer process (CPU
    # tensors move to shared memory in place); the next step() waits for the write ("commit") before the optimizer
    # changes them. Its stall = save_checkpoint() + that wait. Writer "python": FastPersist's "fast" needs libaio.
    try:
        out["deepspeed_decoupled"] = decoupled(args, engine_with, root)
    except Exception as e:  # recorded, not fatal: the comparison says why it could not run
        out["deepspeed_decoupled"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    try:
        out["torch_dcp_async_save"] = dcp_async(args, engine_with, root)
    except Exception as e:
        out["torch_dcp_async_save"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    shutil.rmtree(root, ignore_errors=True)
    return out


def decoupled(args, engine_with, root) -> dict:
    os.environ.setdefault("CROSS_SIZE", "1")  # DeepSpeed's launcher sets them (machines, this machine's index)
    os.environ.setdefault("CROSS_RANK", "0")
    # data_parallel: the default (None) fails in DeepSpeed 0.19.8 (UniversalParallelInfo has no dp_rank)
    eng, x = engine_with({"checkpoint": {"writer": {"type": "python", "decoupled": True, "data_parallel": "replica"}}})
    stalls = []
    try:
        for i in range(args.engine_saves + 1):
            t = time.perf_counter()
            eng.save_checkpoint(os.path.join(root, "decoupled"), tag=f"s{i}", save_latest=False)
            saved = time.perf_counter() - t
            eng.backward(eng(x).loss)
            t = time.perf_counter()
            eng.step()  # commits: waits for the writer
            stalls.append(saved + time.perf_counter() - t)
        eng.checkpoint_engine.cleanup()
    finally:  # after a failed save its writer process stays, and this one would wait for it at exit
        proc = getattr(eng.checkpoint_engine, "ckpt_process", None)
        if proc is not None and proc.is_alive():
            proc.kill()
    return {"stall_s": statistics.median(stalls[1:]), "note": "save_checkpoint() plus the next step()'s wait for "
            "the write (its commit), the step itself included"}


def dcp_async(args, engine_with, root) -> dict:
    # torch.distributed.checkpoint.async_save: its own layout (.distcp + .metadata), which DeepSpeed's loader,
    # ds_to_universal and zero_to_fp32 do not read; the stall is its staging of the state into host memory
    import torch.distributed.checkpoint as dcp
    eng, x = engine_with({})
    stalls, writes = [], []
    for i in range(args.engine_saves + 1):
        t = time.perf_counter()
        fut = dcp.async_save({"model": eng.module.state_dict(), "optim": eng.optimizer.state_dict()},
                             checkpoint_id=os.path.join(root, f"dcp{i}"))
        stalls.append(time.perf_counter() - t)
        fut.result()
        writes.append(time.perf_counter() - t)
    return {"stall_s": statistics.median(stalls[1:]), "write_s": statistics.median(writes[1:])}


def table(res: dict) -> str:
    rows = ["| model | mode | pause per save (s) | stall (s) | background write (s) | MiB/s | GB per save | step (s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for arch, modes in res["runs"].items():
        for mode, r in modes.items():
            rows.append(f"| {arch} | {mode} | {r['pause_per_save_s']:.2f} | {r['stall_s']:.2f} | {r['write_s']:.2f} | "
                        f"{r['mib_per_s']:.0f} | {r['bytes'] / 1e9:.2f} | {r['step_time_s']:.2f} |")
        if {"sync", "async"} <= set(modes):
            s, a = modes["sync"], modes["async"]
            rows.append(f"| {arch} | sync / async | {s['pause_per_save_s'] / max(a['pause_per_save_s'], 1e-3):.1f}x | "
                        f"{s['stall_s'] / max(a['stall_s'], 1e-3):.1f}x | | | | |")
    if res.get("engines"):
        rows += ["", "| ViT-B state, one rank | loop pause per save (s) | write (s) |", "|---|---:|---:|"]
        for name, r in res["engines"].items():
            if "error" in r:
                rows.append(f"| {name} | could not run: {r['error'][:120]} | |")
            else:
                rows.append(f"| {name} | {r['stall_s']:.2f} | {r.get('write_s', float('nan')):.2f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--archs", default="vit-b,vit-l")
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (a save after each)")
    ap.add_argument("--batch", default="vit-b=8,vit-l=2", help="images per step (1 rank), per model")
    ap.add_argument("--every", default="vit-b=1,vit-l=2",
                    help="a save every N steps, per model (ViT-L's write outlasts one step of batch 2 here)")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs per mode (medians over them)")
    ap.add_argument("--run-dir", default=None, help="where the runs write their checkpoints (default: --out-dir), "
                    "e.g. a network filesystem's mount")
    ap.add_argument("--disk", default="local (the output dir's filesystem)", help="what --run-dir is, for the record")
    ap.add_argument("--engines", action="store_true", help="also compare DeepSpeed's decoupled engine and DCP")
    ap.add_argument("--engine-saves", type=int, default=3)
    ap.add_argument("--engine-arch", default="mff_vit_base_patch16")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results",
                                                      f"checkpoint_{datetime.date.today().isoformat()}"))
    ap.add_argument("--one", nargs=3, metavar=("ARCH", "MODE", "EVERY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        arch, mode, every = args.one
        print(json.dumps(one(arch, mode, int(every), args.steps, int(args.batch), args.out_dir)))
        return
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.run_dir or args.out_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.run_dir or args.out_dir)
    res = {"runs": {}, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", "python"] + sys.argv),
           "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "mem_gib": _mem_gib(),
                       "python": platform.python_version(),
                       "disk": args.disk}}
    try:
        for arch in [a for a in args.archs.split(",") if a]:
            tries = {}
            for _ in range(args.repeats):  # the modes alternate, so a change in the machine's load hits both
                for mode in args.modes.split(","):
                    every = int(per_arch(args.every, arch))
                    pair = {k: run_one(args, arch, mode, n, scratch) for k, n in (("final", 0), ("every", every))}
                    tries.setdefault(mode, []).append(dict(summarize(pair["every"]["checkpoints"], pair, args.steps),
                                                           raw=pair, load_avg=os.getloadavg()))
                    print(arch, mode, {k: v for k, v in tries[mode][-1].items() if k != "raw"}, flush=True)
            for mode, runs in tries.items():
                med = {k: statistics.median(r[k] for r in runs) for k in ("pause_per_save_s", "stall_s", "write_s",
                                                                         "bytes", "mib_per_s", "step_time_s")}
                res["runs"].setdefault(arch, {})[mode] = dict(med, batch=batch_of(args, arch), tries=runs,
                                                              every=int(per_arch(args.every, arch)),
                                                              pause_per_save_each=[r["pause_per_save_s"] for r in runs])
        if args.engines:
            res["engines"] = engines(args)
            print(res["engines"], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with open(os.path.join(args.out_dir, "checkpoint.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = table(res)
    with open(os.path.join(args.out_dir, "checkpoint.md"), "w") as f:
        f.write(f"# Checkpoint cost, {res['date']}\n\n{res['machine']}\n\n`{res['command']}`\n\n{md}\n")
    print(md)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _mem_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return 0.0


if __name__ == "__main__":
    main()
