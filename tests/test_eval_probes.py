"""Statistics over seeds (known t intervals) and the feature probes (k-NN, logistic regression): a linearly
separable set gives 100%, chance-level data does not, and probing an encoder twice gives the same number."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mff_ds.eval import probes, stats
from mff_ds.eval.recipe import EvalData

from test_eval import TINY, _imagefolder
import forkserver

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ statistics
def test_spread_ratio_of_a_known_pair():
    # variances 2.5 and 10: ratio 0.25; the F(4, 4) CDF at 0.25 is I_z(2, 2) = 3z^2 - 2z^3 with
    # z = 4 * 0.25 / (4 * 0.25 + 4) = 0.2, i.e. 0.104: two-sided p 0.208, also with the samples swapped (ratio 4)
    a, b = [1, 2, 3, 4, 5], [2, 4, 6, 8, 10]
    assert stats.spread_ratio(a, b) == pytest.approx((0.25, 0.208), abs=1e-9)
    assert stats.spread_ratio(b, a) == pytest.approx((4.0, 0.208), abs=1e-9)
    assert stats.spread_ratio(a, a) == pytest.approx((1.0, 1.0))
    ratio, p = stats.spread_ratio(a, [3, 3, 3])
    assert ratio == math.inf and math.isnan(p)
    with pytest.raises(ValueError, match="at least 2 values in each sample, got 1 and 5"):
        stats.spread_ratio([1], a)


def test_mean_ci_of_a_known_sample():
    # 1..5: mean 3, sd sqrt(2.5), t(0.975, 4 df) = 2.7764451 -> half width 2.7764451 * sqrt(2.5) / sqrt(5)
    ci = stats.mean_ci([1, 2, 3, 4, 5])
    assert ci.mean == pytest.approx(3.0)
    assert ci.sd == pytest.approx(math.sqrt(2.5))
    assert ci.half_width == pytest.approx(1.963243, abs=1e-6)
    assert (ci.low, ci.high) == pytest.approx((1.036757, 4.963243), abs=1e-6)
    # two values 0 and 2: sd sqrt(2), t(0.975, 1 df) = 12.7062047 -> half width 12.7062047
    assert stats.mean_ci([0.0, 2.0]).half_width == pytest.approx(12.7062047, abs=1e-6)
    # 90% interval of 1..5: t(0.95, 4 df) = 2.1318468
    assert stats.mean_ci([1, 2, 3, 4, 5], level=0.9).half_width == pytest.approx(2.1318468 / math.sqrt(2), abs=1e-6)


def test_one_value_has_an_unbounded_interval_and_bad_input_is_refused():
    ci = stats.mean_ci([7.0])
    assert ci.mean == 7.0 and ci.low == -math.inf and ci.high == math.inf and not ci.excludes(0.0)
    with pytest.raises(ValueError, match="at least one value"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="same length"):
        stats.paired_diff([1, 2], [1])


def test_paired_difference_removes_the_shared_seed_effect():
    # the seed moves both encoders by the same large amount; a is always 1 point above b
    seed_effect = [10.0, -8.0, 3.0, 0.0, -5.0]
    a = [60 + s + 1 for s in seed_effect]
    b = [60 + s for s in seed_effect]
    unpaired = (stats.mean_ci(a), stats.mean_ci(b))
    assert unpaired[0].low < unpaired[1].high        # the separate intervals overlap
    d = stats.paired_diff(a, b)
    assert d.mean == pytest.approx(1.0) and d.half_width == pytest.approx(0.0, abs=1e-9) and d.excludes(0.0)
    assert stats.verdict(d, "A", "B").startswith("A beats B by 1.00")
    noisy = stats.paired_diff([1.0, -1.0, 2.0], [0.0, 0.0, 0.0])
    assert not noisy.excludes(0.0) and stats.verdict(noisy, "A", "B").startswith("no difference")


# ------------------------------------------------------------------ probes on given features
def _separable(n=200, dim=16, classes=4, seed=0):
    """Gaussian blobs around well separated class centres (margin >> noise): linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.eye(classes, dim)
    y = torch.arange(n) % classes
    return centres[y] + 0.5 * torch.randn(n, dim, generator=g), y


def test_probes_score_100_on_a_linearly_separable_set():
    res = probes.run_probes(_separable(seed=0), _separable(n=100, seed=1))
    assert res == {"knn": 100.0, "logreg": 100.0}


def test_probes_are_at_chance_when_features_carry_no_label():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 8, generator=g), torch.randint(0, 4, (600,), generator=g)
    res = probes.run_probes((x[:400], y[:400]), (x[400:], y[400:]))
    assert all(10 < v < 45 for v in res.values()), res     # 4 classes: chance 25%


def test_cross_validation_scores_every_sample_once():
    x, y = _separable(n=203, seed=0)                  # 203: folds of unequal size
    assert probes.cv_probes(x, y, folds=5) == {"knn": 100.0, "logreg": 100.0}
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(800, 8, generator=g), torch.randint(0, 4, (800,), generator=g)
    res = probes.cv_probes(noise, labels, folds=4)
    assert all(15 < v < 35 for v in res.values()), res     # 4 classes: chance 25%
    # the score is the pooled top-1 over all samples, each scored by a probe that did not see it: flipping the
    # labels of 10 samples to a class their cluster does not hold costs exactly those 10 (k-NN, tight clusters)
    y_bad = y.clone()
    y_bad[:10] = (y[:10] + 1) % 4
    assert probes.cv_probes(x, y_bad, ["knn"], folds=5)["knn"] == pytest.approx(100.0 * (203 - 10) / 203)
    # the folds are fixed: the same features give the same score whatever the global RNG state
    torch.manual_seed(123)
    assert probes.cv_probes(noise, labels, folds=4) == res
    for bad in (1, 0, 300):
        with pytest.raises(ValueError, match=f"folds: expected an integer from 2 to 50 .*got {bad}"):
            probes.cv_probes(x, y, folds=bad)


def test_knn_weights_votes_by_similarity():
    # one very close neighbour of class 1 outweighs two distant ones of class 0 (T 0.07 sharpens the weights)
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    test_x, test_y = torch.tensor([[1.0, 0.3]]), torch.tensor([1])
    assert probes.knn_top1(train_x, train_y, test_x, test_y, k=3) == 100.0
    assert probes.knn_top1(train_x, train_y, test_x, test_y, k=3, temperature=100.0) == 0.0  # ~uniform: majority
    with pytest.raises(ValueError, match="positive integer"):
        probes.knn_top1(train_x, train_y, test_x, test_y, k=0)
    with pytest.raises(ValueError, match="expected some of knn, logreg"):
        probes.run_probes((train_x, train_y), (test_x, test_y), ["svm"])


# ------------------------------------------------------------------ probes on an encoder
def _data(tmp_path):
    return EvalData(source="imagefolder", train_path=_imagefolder(tmp_path / "train", per_class=10),
                    val_path=_imagefolder(tmp_path / "val", per_class=6, seed=1), num_workers=0)


def test_probe_encoder_is_deterministic_and_seed_picks_the_random_encoder(tmp_path):
    data = _data(tmp_path)
    a = probes.probe_encoder(None, data, model=dict(TINY), seed=1, pool="avg")
    b = probes.probe_encoder(None, data, model=dict(TINY), seed=1, pool="avg")
    assert a == b and set(a) == {"knn", "logreg"}
    # the images' dominant colour channel is the class: even a random encoder's features keep it
    assert a["logreg"] > 60, a


def test_linprobe_cli_runs_the_feature_probes(tmp_path):
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(json.dumps({"name": "p", "task": "linprobe", "model": dict(TINY),
                               "data": {"source": "imagefolder", "train_path": _imagefolder(tmp_path / "train"),
                                        "val_path": _imagefolder(tmp_path / "val", seed=1), "num_workers": 0}}))
    out = tmp_path / "out"
    r = forkserver.run([sys.executable, "launch/linprobe.py", "--config", str(cfg), "--probe", "knn,logreg",
                        "--output-dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "probes.json").read_text())
    assert set(res["top1"]) == {"knn", "logreg"} and res["pool"] == "cls" and "knn top-1" in r.stdout
    r = forkserver.run([sys.executable, "launch/linprobe.py", "--config", str(cfg), "--probe", "svm",
                        "--output-dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "expected some of knn, logreg" in r.stderr


def _probe_cmd(cfg, out, probe="knn,logreg"):
    return [sys.executable, "-m", "mff_ds", "linprobe", "--config", str(cfg), "--probe", probe, "--output-dir",
            str(out)]


def _children(pid: int) -> list:
    """PIDs of the processes whose parent is `pid` (data-loader workers)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _gone(pid: int, within=30.0) -> bool:
    """True once `pid` has exited and been reaped (bounded wait: a worker may still be unwinding)."""
    import time
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # exited; its new parent reaps it
        except OSError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig, code", [("SIGTERM", 75), ("SIGINT", 130)])
def test_a_stop_signal_ends_the_feature_probes_and_their_workers(tmp_path, sig, code):
    """The probes save nothing to resume: `mff-ds linprobe --probe knn,logreg` stops within seconds on SIGTERM or
    SIGINT, with one line and the documented exit code, and leaves no data-loader worker behind, even one stuck
    reading a file (a FIFO that nobody writes)."""
    import os
    import subprocess
    from test_cli import stop_while_reading, user_lines
    train = Path(_imagefolder(tmp_path / "train"))
    stuck = train / "0" / "stuck.png"
    os.mkfifo(stuck)
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(json.dumps({"name": "p", "task": "linprobe", "model": dict(TINY),
                               "data": {"source": "imagefolder", "train_path": str(train),
                                        "val_path": _imagefolder(tmp_path / "val", seed=1), "num_workers": 1}}))
    out = tmp_path / "out"
    p = forkserver.popen(_probe_cmd(cfg, out), env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    stdout, stderr, workers = stop_while_reading(p, stuck, "a data-loader worker read the training images", sig,
                                                 before=lambda: _children(p.pid))
    assert p.returncode == code, stdout[-2000:] + stderr[-2000:]
    assert user_lines(stderr) == [f"stopped by {sig} during the knn, logreg probes: the feature probes save nothing "
                                  f"to resume; rerun the command"], stderr[-3000:]
    assert not (out / "probes.json").exists()
    assert workers and all(_gone(w) for w in workers), workers


def test_a_stop_signal_during_start_up_ends_the_probes_before_they_begin(tmp_path):
    """A SIGTERM while the command still reads its recipe (here a FIFO the test writes after the signal) is kept
    by the handlers `mff-ds` installs first, and the probes stop as they begin instead of running to the end."""
    import os
    import signal
    import subprocess
    from test_cli import reader_of, user_lines
    cfg = tmp_path / "probe.yaml"
    os.mkfifo(cfg)
    out = tmp_path / "out"
    p = forkserver.popen(_probe_cmd(cfg, out, "knn"), env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recipe = json.dumps({"name": "p", "task": "linprobe", "model": dict(TINY),
                         "data": {"source": "imagefolder", "train_path": _imagefolder(tmp_path / "train"),
                                  "val_path": _imagefolder(tmp_path / "val", seed=1), "num_workers": 0}})
    try:
        w = reader_of(cfg, p, "the command read its recipe")
        try:
            p.send_signal(signal.SIGTERM)
            os.write(w, recipe.encode())
        finally:
            os.close(w)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()  # (if it is still running: the test has failed)
    assert p.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert user_lines(stderr) == ["stopped by SIGTERM during the knn probe: the feature probes save nothing to "
                                  "resume; rerun the command"], stderr[-3000:]
    assert not (out / "probes.json").exists()


# ------------------------------------------------------------------ the multi-seed demo's report
def _demo():
    sys.path.insert(0, "launch")
    import eval_demo
    return eval_demo


def test_eval_demo_reports_intervals_and_paired_differences(tmp_path):
    demo = _demo()
    seeds = [0, 1, 2]
    res = {"knn": {"MFF": [80.0, 82.0, 84.0], "MAE": [79.0, 81.0, 83.0], "random init": [60.0, 70.0, 65.0]}}
    text = demo.summarize(res, seeds)
    # MFF: mean 82, sd 2, t(0.975, 2) = 4.3026527 -> half width 4.3026527 * 2 / sqrt(3) = 4.968
    assert "[77.03, 86.97]" in text
    # MFF - MAE is exactly +1 on every seed: a zero-width interval that excludes 0
    assert "MFF beats MAE by 1.00" in text
    assert "no difference between MFF and random init" not in text and "MFF beats random init" in text
    png = tmp_path / "p.png"
    demo.plot(res, seeds, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_demo_refuses_bad_arguments_in_one_line(capsys):
    for args, msg in ((["--seeds", "1"], "--seeds: expected at least 2 seeds (an interval needs 2), got 1"),
                      (["--folds", "1"], "--folds: expected 0 or at least 2, got 1"),
                      (["--jobs", "0"], "--jobs: expected at least 1, got 0")):
        assert _demo().main(args) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"error: {msg}", err


def test_eval_demo_pretrains_side_by_side_and_probes_by_folds(tmp_path):
    # one epoch (22 steps) per pretraining: what is checked is the plumbing, not the encoders' quality
    out = tmp_path / "demo"
    args = [sys.executable, "launch/eval_demo.py", "--seeds", "2", "--first-seed", "5", "--pretrain-epochs", "1",
            "--folds", "3", "--jobs", "2", "--output-dir", str(out)]
    r = forkserver.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [5, 6] and res["folds"] == 3
    assert all(len(v) == 2 and all(0 < x <= 100 for x in v) for per in res["top1"].values() for v in per.values())
    assert r.stdout.count("pretrained ") == 4 and "(22 steps, final loss" in r.stdout
    assert "knn top-1, 3-fold cross-validation over all digits, 2 seeds" in r.stdout
    knn = res["top1"]["knn"]
    ratio, p = stats.spread_ratio(knn["MFF"], knn["MAE"])
    assert f"variance ratio {ratio:.2f} (two-sided F-test p {p:.2f})" in r.stdout
    # MFF pretrains with the recipe's levels, MAE with the last block alone
    recipe = yaml.safe_load((REPO / "configs" / "pretrain_digits_demo.yaml").read_text())["model"]
    for kind, levels in (("mff", recipe["out_indices"]), ("mae", [recipe["depth"] - 1])):
        ran = yaml.safe_load((out / "seed5" / f"pretrain_{kind}" / "recipe.yaml").read_text())["model"]
        assert ran["out_indices"] == levels

    # benchmarks/probe_blocks.py on the same runs: a k-NN top-1 per block, and after the final norm exactly what the
    # demo's probe gave (the same features, folds and classifier)
    blocks = tmp_path / "blocks.json"
    r = forkserver.run([sys.executable, "benchmarks/probe_blocks.py", str(out), "--folds", "3", "--json", str(blocks)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    per_run = json.loads(blocks.read_text())
    assert len(per_run) == 4
    for run, rows in per_run.items():
        seed, kind = int(run.split("seed")[-1].split("/")[0]), run.rsplit("_", 1)[-1].upper()
        assert len(rows["final"]) == recipe["depth"] + 1 and all(0 < v <= 100 for v in rows["final"])
        assert rows["final"][-1] == pytest.approx(res["top1"]["knn"][kind][seed - 5], abs=0.06)
    assert "pretrain_mff, 2 runs, mean (sd) per block" in r.stdout
    # --checkpoints on one pretraining: its last checkpoint holds the final weights
    mff = next(run for run in per_run if run.endswith("pretrain_mff"))
    r = forkserver.run([sys.executable, "benchmarks/probe_blocks.py", mff, "--checkpoints", "--folds", "3", "--json",
                        str(blocks)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (label, row), = json.loads(blocks.read_text())[mff].items()
    assert label.startswith("step ") and row == per_run[mff]["final"]


def test_probe_blocks_refuses_a_dir_without_runs_in_one_line(tmp_path, capsys):
    sys.path.insert(0, "benchmarks")
    import probe_blocks
    assert probe_blocks.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path}: expected a pretraining dir (recipe.yaml) or an eval_demo output dir "
                   f"(seed*/pretrain_*/recipe.yaml), got neither"), err
