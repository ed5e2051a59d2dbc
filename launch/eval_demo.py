#!/usr/bin/env python
"""Pretraining -> probing on CPU with bundled real data, over several seeds (`make eval-demo`):

  1. for each seed, pretrain a tiny MFF and a tiny plain MAE (same model, data and schedule; only the fusion
     differs) on scikit-learn's digits upscaled to 32 px (configs/pretrain_digits_demo.yaml, the pretraining
     trainer); the pretrainings run side by side, one per core (--jobs), each in its own process;
  2. probe both and a randomly initialised encoder of the same seed on frozen features (mff_ds/eval/probes.py:
     weighted k-NN and logistic regression, deterministic for a given encoder) by 5-fold cross-validation over
     all 1,797 digits (--folds; 0 = fit on the train split and score the 359-image val split);
  then print, per probe and encoder, the mean top-1 over seeds with its 95% Student-t interval, the paired
  differences (MFF - MAE, each - random init) with theirs, and plot the per-seed points (PNG).
  A difference is called one only when its interval excludes zero.

  python launch/eval_demo.py [--seeds N] [--first-seed S] [--output-dir runs/eval_demo] [--pretrain-epochs N]
                             [--pool cls|avg] [--folds K] [--jobs N] [--lars]

Finished pretrainings are reused when the command is rerun (a seed's run directory is resumed, not redone), and
Ctrl-C or SIGTERM makes the running ones save first. --lars also runs the reference linear probe
(configs/linprobe_demo.yaml: LARS, random crops, on the train/val split), which is slower and noisier.
"""
import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mff_ds.engine import signals  # noqa: E402

ENCODERS = ("MFF", "MAE", "random init")
LEVELS = {"MFF": None, "MAE": "[5]"}  # MFF: the recipe's levels; MAE: the last block alone


def pretrain_recipe(name: str = "MFF", seed: int = 0, epochs=None):
    from mff_ds.data.demo import digits_root
    from mff_ds.pretrain.recipe import load_recipe
    extra = [f"schedule.epochs={epochs}", f"schedule.warmup_epochs={epochs / 10}"] if epochs else []
    return load_recipe("configs/pretrain_digits_demo.yaml",
                       [f"name=pretrain_digits_{name.lower()}", f"seed={seed}",
                        f"data.path={digits_root('train')}"] + extra
                       + ([f"model.out_indices={LEVELS[name]}"] if LEVELS[name] else []))


def pretrain(name: str, seed: int, out: str, epochs) -> tuple:
    """-> (model file, last loss, steps) of the seed's MFF or MAE pretraining (resumed if already under `out`)."""
    from mff_ds.pretrain import train
    s = train(pretrain_recipe(name, seed, epochs), out, resume="auto")
    return os.path.join(out, "model_fp32.safetensors"), s["last_loss"], s["step"], s["stopped_by"]


def lars_probe(ckpt, seed: int, out: str) -> float:
    from mff_ds.eval.recipe import load_eval_recipe
    from mff_ds.eval.train import run
    overrides = [f"seed={seed}"] + ([f"init.checkpoint={ckpt}"] if ckpt else [])
    return run(load_eval_recipe("configs/linprobe_demo.yaml", overrides), out, resume="fresh", quiet=True)["last_top1"]


def summarize(results: dict, seeds: list, folds: int = 0) -> str:
    """The tables: per probe, each encoder's per-seed top-1, mean, 95% CI and sd; then the paired differences and
    MFF's spread against MAE's."""
    from mff_ds.eval.metrics import table
    from mff_ds.eval.stats import mean_ci, paired_diff, spread_ratio, verdict
    lines = []
    for probe, per_enc in results.items():
        rows, sd = [], {}
        for enc in ENCODERS:
            ci = mean_ci(per_enc[enc])
            sd[enc] = ci.sd
            rows.append({"encoder": enc, **{f"seed {s}": v for s, v in zip(seeds, per_enc[enc])},
                         "mean": ci.mean, "95% CI": f"[{ci.low:.2f}, {ci.high:.2f}]", "sd": ci.sd})
        pairs = [("MFF", "MAE"), ("MFF", "random init"), ("MAE", "random init")]
        for a, b in pairs:
            d = paired_diff(per_enc[a], per_enc[b])
            rows.append({"encoder": f"{a} - {b}", **{f"seed {s}": x - y for s, x, y in
                                                     zip(seeds, per_enc[a], per_enc[b])},
                         "mean": d.mean, "95% CI": f"[{d.low:+.2f}, {d.high:+.2f}]", "sd": d.sd})
        scored = (f"{folds}-fold cross-validation over all digits" if folds and probe != "LARS linear" else
                  "the digits val split")
        lines += [f"\n{probe} top-1, {scored}, {len(seeds)} seeds; mean and 95% Student-t interval "
                  f"(differences: paired by seed)",
                  table(rows, ["encoder"] + [f"seed {s}" for s in seeds] + ["mean", "95% CI", "sd"])]
        lines += [f"  {verdict(paired_diff(per_enc[a], per_enc[b]), a, b)}" for a, b in pairs]
        ratio, p = spread_ratio(per_enc["MFF"], per_enc["MAE"])
        lines.append(f"  seed-to-seed spread: MFF sd {sd['MFF']:.2f}, MAE sd {sd['MAE']:.2f}, variance ratio "
                     f"{ratio:.2f} (two-sided F-test p {p:.2f})")
    return "\n".join(lines)


def plot(results: dict, seeds: list, path: str) -> None:
    """Per-seed points (one colour per seed) beside each encoder's mean and 95% interval, one panel per probe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mff_ds.eval.stats import mean_ci
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (probe, per_enc) in zip(axes[0], results.items()):
        for i, enc in enumerate(ENCODERS):
            xs = [i - 0.15 + 0.3 * j / max(len(seeds) - 1, 1) for j in range(len(seeds))]
            ax.scatter(xs, per_enc[enc], c=[f"C{j % 10}" for j in range(len(seeds))], s=18, zorder=3)
            ci = mean_ci(per_enc[enc])
            if len(seeds) > 1:
                ax.errorbar([i + 0.3], [ci.mean], yerr=[[ci.mean - ci.low], [ci.high - ci.mean]], fmt="k_",
                            capsize=4, markersize=12)
        ax.set_xticks(range(len(ENCODERS)), ENCODERS)
        ax.set_title(f"{probe} probe, digits")
        ax.set_ylabel("top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"seeds {seeds[0]}-{seeds[-1]}: points per seed, bar = mean and 95% CI", fontsize=9)
    fig.tight_layout()
    from mff_ds.common import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def default_jobs(tasks: int) -> int:
    """Pretrainings at once: one per core (at most 8, about 1 GB each). The tiny model's ops are too small for
    threads to help much (2 threads: 1.2x one thread's speed), so separate processes use the cores better."""
    return max(1, min(tasks, os.cpu_count() or 1, 8))


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    signals.catch()  # the pretraining saves a checkpoint and returns on SIGINT / SIGTERM
    import torch
    torch.set_num_threads(threads)


def _pretrain_job(name: str, seed: int, out: str, epochs) -> tuple:
    t = time.time()
    return pretrain(name, seed, out, epochs) + (time.time() - t,)


def pretrain_all(tasks: list, epochs, jobs: int, t0: float) -> dict:
    """{(encoder, seed): (model file, loss, steps, stopped_by, seconds)} of the (encoder, seed, run dir) `tasks`,
    `jobs` at a time, each in its own process with cores // jobs threads. A stop signal to this process is passed
    on (SIGTERM) to the running pretrainings, which save and return; the ones not started are dropped."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    stop, done, forwarded = signals.StopOnSignal(), {}, False
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawn, not fork: a forked child of a process whose OpenMP threads ran can hang in its first parallel region
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as ex:
        pending = {ex.submit(_pretrain_job, enc, seed, out, epochs): (enc, seed) for enc, seed, out in tasks}
        while pending:
            finished, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            failed = next((f.exception() for f in finished if not f.cancelled() and f.exception()), None)
            if (stop.received or failed) and not forwarded:
                forwarded = True
                for f in pending:
                    f.cancel()
                for child in mp.active_children():
                    child.terminate()
            if failed:
                raise failed
            for f in finished:
                enc, seed = pending.pop(f)
                if f.cancelled():
                    continue
                done[enc, seed] = ckpt, loss, steps, stopped_by, secs = f.result()
                state = (f"stopped by {stopped_by} at step {steps}" if stopped_by else
                         "done earlier" if loss is None else f"final loss {loss:.3f}")  # None: nothing left to run
                print(f"[{time.time() - t0:5.0f}s] seed {seed}: pretrained {enc} ({steps} steps, {state}, "
                      f"{secs:.0f}s)", flush=True)
            pending = {f: k for f, k in pending.items() if not f.cancelled()}
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (pretraining and random init)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--output-dir", default=os.path.join("runs", "eval_demo"))
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--pool", default="cls", choices=["cls", "avg"], help="probe features: cls token or mean patch")
    p.add_argument("--folds", type=int, default=5,
                   help="k-fold cross-validation over all digits (0: fit on the train split, score the val split)")
    p.add_argument("--jobs", type=int, default=None, help="pretrainings at once (default: one per core, at most 8)")
    p.add_argument("--lars", action="store_true", help="also run the reference LARS linear probe (slower)")
    a = p.parse_args(argv)
    for flag, value, ok, expected in (("--seeds", a.seeds, a.seeds >= 2, "at least 2 seeds (an interval needs 2)"),
                                      ("--folds", a.folds, a.folds == 0 or a.folds >= 2, "0 or at least 2"),
                                      ("--jobs", a.jobs, a.jobs is None or a.jobs >= 1, "at least 1")):
        if not ok:
            print(f"error: {flag}: expected {expected}, got {value}", file=sys.stderr)
            return 2
    t0 = time.time()
    stop = signals.StopOnSignal.install()  # Ctrl-C / SIGTERM: the pretrainings save; rerunning continues from there
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from mff_ds.engine.trainer import IncompatibleCheckpointError
    from mff_ds.eval import probes
    from mff_ds.eval.recipe import EvalData
    from mff_ds.common import write_json

    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    tasks = [(enc, seed, os.path.join(a.output_dir, f"seed{seed}", f"pretrain_{enc.lower()}"))
             for seed in seeds for enc in ENCODERS if enc != "random init"]
    try:
        trained = pretrain_all(tasks, a.pretrain_epochs, a.jobs or default_jobs(len(tasks)), t0)
    except IncompatibleCheckpointError as e:
        print(f"error: {a.output_dir} holds a pretraining with other settings ({e}); pass another --output-dir",
              file=sys.stderr)
        return 2
    stopped = [r[3] for r in trained.values() if r[3]]
    if stop.received or stopped or len(trained) < len(tasks):
        print("stopped: the pretrainings saved checkpoints; rerun the same command to continue", flush=True)
        return signals.exit_code(stopped[0] if stopped else signal.Signals(stop.received).name)

    # the random encoder has the pretrained ones' architecture; images are decoded once for every probe
    model = {k: v for k, v in pretrain_recipe().model.items()
             if k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    model["out_indices"] = [model["depth"] - 1]
    images = probes.load_images(EvalData(source="digits", num_workers=0), model["img_size"])
    results = {name: {e: [] for e in ENCODERS} for name in probes.PROBES + (("LARS linear",) if a.lars else ())}
    for seed in seeds:
        for enc in ENCODERS:
            ckpt = trained[enc, seed][0] if enc != "random init" else None
            encoder = probes.build_encoder(ckpt, model=model, seed=seed)
            for name, top1 in probes.probe_images(encoder, images, pool=a.pool, folds=a.folds).items():
                results[name][enc].append(top1)
            if a.lars:
                out = os.path.join(a.output_dir, f"seed{seed}", f"linprobe_{enc.split()[0].lower()}")
                results["LARS linear"][enc].append(lars_probe(ckpt, seed, out))
            print(f"[{time.time() - t0:5.0f}s] seed {seed}: {enc}: " +
                  ", ".join(f"{k} {v[enc][-1]:.2f}" for k, v in results.items()), flush=True)
    os.makedirs(a.output_dir, exist_ok=True)
    write_json(os.path.join(a.output_dir, "results.json"),
               {"seeds": seeds, "pool": a.pool, "folds": a.folds, "top1": results})
    png = os.path.join(a.output_dir, "eval_demo.png")
    plot(results, seeds, png)
    print(summarize(results, seeds, a.folds))
    print(f"\nplot {png}; per-seed numbers {os.path.join(a.output_dir, 'results.json')}; "
          f"wall time {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
