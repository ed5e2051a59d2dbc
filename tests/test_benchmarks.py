"""benchmarks/: the throughput harness (CPU mode), the official-MAE baseline, the FLOP count behind MFU, and the
ZeRO-2 scaling model. Fields and sanity only, never speed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import forkserver  # noqa: E402
import scaling_model  # noqa: E402
import throughput  # noqa: E402
from mae_baseline import BaselineTrainer, build_baseline  # noqa: E402
from mff_ds.models import build_model  # noqa: E402
from mff_ds.models.flops import flops_per_image  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
             decoder_num_heads=2, kernels="torch")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MFF_DS_LOG_LEVEL="WARNING")


def test_throughput_cpu_mode(tmp_path):
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu", "--steps", "6",
           "--warmup", "1", "--micro-batch", "8", "--peak-tflops", "1.0", "--json", str(out)]
    p = forkserver.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    for role in ("mff", "mae", "baseline_mae"):
        r = res[role]
        assert r["timed_steps"] == 6
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["img_per_s_iqr"] >= 0
        assert r["img_per_s_min"] <= r["img_per_s_q1"] <= r["img_per_s"] <= r["img_per_s_q3"] <= r["img_per_s_max"]
        # MFU = analytic FLOPs x img/s / peak (1 TFLOP/s here)
        assert math.isclose(r["mfu"], r["gflops_per_image"] * 1e9 * r["img_per_s"] / 1e12, rel_tol=1e-9)
        assert r["peak_mem_mb"] is None  # CUDA only
    assert res["mff"]["gflops_per_image"] > res["mae"]["gflops_per_image"] == res["baseline_mae"]["gflops_per_image"]
    assert res["mff"]["params_m"] > res["mae"]["params_m"]
    assert res["mff"]["optimizer"] == "AdamW(fused=True)"
    assert res["ratio_mff_over_mae"] > 0 and res["mff"]["host_syncs_per_step"] >= 0
    assert math.isclose(res["speedup_over_baseline"], res["mae"]["img_per_s"] / res["baseline_mae"]["img_per_s"])
    assert math.isclose(res["speedup_mff_over_baseline"], res["mff"]["img_per_s"] / res["baseline_mae"]["img_per_s"])
    c = res["config"]
    assert (c["micro_batch"], c["precision"], c["steps"], c["img_size"]) == (8, "fp32", 6, throughput.TINY["img_size"])
    assert c["mff_model"]["out_indices"] == throughput.TINY_MFF_LEVELS and c["mae_model"]["out_indices"] == [5]
    assert res["device"].startswith("CPU") and "--micro-batch 8" in res["command"]
    md = (tmp_path / "tp.md").read_text()
    assert "| MFF (ours" in md and "MAE (facebookresearch/mae loop)" in md
    assert (tmp_path / "tp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overhead_preset_compares_engine_and_plain_loop_on_vit_b_layout(tmp_path):
    out = tmp_path / "ovh.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu", "--preset", "overhead",
           "--steps", "3", "--warmup", "1", "--json", str(out)]
    p = forkserver.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    c = res["config"]
    assert (c["precision"], c["micro_batch"], c["zero_stage"]) == ("bf16", 2, 1)  # the ViT-B recipes' path
    assert (c["model"]["depth"], c["model"]["decoder_depth"], len(c["model"]["out_indices"])) == (12, 8, 6)
    assert c["n_param_tensors"] == sum(1 for _ in build_model("mff_vit_base_patch16").parameters())
    for role in ("engine", "plain", "engine_stock"):
        assert res[role]["host_ms_per_step"] > 0 and 0 <= res[role]["host_syncs_per_step"] <= 8
    assert res["ratio_engine_over_plain"] > 0 and res["ratio_stock_engine_over_plain"] > 0
    assert "engine / plain" in (tmp_path / "ovh.md").read_text()


def test_precisions_compares_mff_across_precisions(tmp_path):
    out = tmp_path / "prec.json"
    res = throughput.main(["--device", "cpu", "--precisions", "fp32,amp-bf16", "--steps", "2", "--warmup", "1",
                           "--micro-batch", "4", "--set", "depth=2", "--set", "out_indices=[0,1]", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == res["rows"] and [r["precision"] for r in rows] == ["fp32", "amp-bf16"]
    assert [(r["weights"], r["compute"]) for r in rows] == [("float32", "float32"), ("float32", "bfloat16")]
    assert rows[0]["ratio_over_fp32"] == 1.0 and rows[1]["ratio_over_fp32"] > 0 and rows[1]["step_ms"] > 0
    assert "| amp-bf16 | float32 | bfloat16 |" in (tmp_path / "prec.md").read_text()


@pytest.mark.parametrize("argv, msg", [
    (["--device", "cpu", "--precision", "fp16"], "fp16"),
    (["--device", "cpu", "--precisions", "bf16,amp-fp16"], "amp-fp16: needs a CUDA device"),
    (["--device", "cpu", "--kernels", "triton"], "triton"),
    (["--device", "cpu", "--arch", "mae_vit_base_patch16"], "expected an MFF arch"),
    (["--device", "cpu", "--set", "depth"], "KEY=VALUE"),
])
def test_throughput_bad_options(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        throughput.main(argv)
    assert msg in str(e.value)


def test_model_configs_follow_overrides():
    args = throughput.parse_args(["--preset", "none", "--set", "depth=4", "--img-size", "64"])
    mff, mae = throughput.model_configs(args, torch.device("cpu"))
    assert (mff.depth, mff.img_size, mae.depth, mae.img_size) == (4, 64, 4, 64)
    assert len(mff.levels) > 1 and mae.levels == [3]


def test_baseline_is_the_same_mae():
    """The official-style model computes our plain MAE's loss and gradients for the same weights and mask."""
    torch.manual_seed(0)
    ours = build_model("mae_vit_tiny_patch16", **SMALL, out_indices=[2])
    base = build_baseline(ours.cfg)
    base.load_state_dict(ours.state_dict())
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    a, b = ours(x, noise).loss, base(x, noise=noise)[0]
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    ga, gb = dict(ours.named_parameters()), dict(base.named_parameters())
    for n, p in ga.items():
        if p.requires_grad:
            assert torch.allclose(p.grad, gb[n].grad, rtol=1e-4, atol=1e-6), n


def test_baseline_trainer_steps():
    torch.manual_seed(0)
    cfg = build_model("mae_vit_tiny_patch16", **SMALL, out_indices=[2]).cfg
    t = BaselineTrainer(build_baseline(cfg), "fp32", torch.device("cpu"))
    before = t.model.decoder_pred.weight.detach().clone()
    loss = t.step(torch.randn(4, 3, 32, 32))
    assert math.isfinite(loss)
    assert not torch.equal(before, t.model.decoder_pred.weight)
    assert all(p.grad is None for p in t.model.parameters())  # zero_grad after the step, as the official loop
    with pytest.raises(ValueError, match="fp16"):
        BaselineTrainer(build_baseline(cfg), "fp16", torch.device("cpu"))


def test_flops_match_counter_on_official_baseline():
    """MFU's analytic FLOPs agree with torch's FLOP counter on the reference (official) MAE."""
    torch.manual_seed(0)
    cfg = build_model("mae_vit_tiny_patch16", img_size=64, patch_size=16, embed_dim=96, depth=4, num_heads=3,
                      decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, out_indices=[3]).cfg
    model = build_baseline(cfg)
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(4, 3, 64, 64))[0].backward()
    counted = fc.get_total_flops() / 4
    assert abs(flops_per_image(cfg) - counted) / counted < 0.02, (flops_per_image(cfg), counted)


# ------------------------------------------------------------------ scaling model
KW = dict(step_s=0.4, micro_batch=256, params=100e6, grad_bytes=2, param_bytes=2, global_batch=4096,
          gpus_per_node=8, intra_gbps=300.0, inter_gbps=100.0, intra_latency_us=5.0, inter_latency_us=10.0,
          overlap=0.0)


def test_scaling_model_arithmetic():
    one = scaling_model.step_model(1, **KW)
    assert one["efficiency"] == 1.0 and one["exposed_comm_s"] == 0 and one["accum"] == 16
    r = scaling_model.step_model(4, **KW)  # intra-node: 1024 img/GPU -> 4 micro steps, 4 reduce-scatters
    ring = 3 / 4 * 100e6 * 2 / 300e9 + 3 * 5e-6
    assert r["accum"] == 4 and math.isclose(r["reduce_scatter_s"], 4 * ring) and math.isclose(r["all_gather_s"], ring)
    assert math.isclose(r["step_s"], 1024 * 0.4 / 256 + 5 * ring)
    r = scaling_model.step_model(64, **KW)  # inter-node bandwidth beyond 8 GPUs; 64 img/GPU in one micro step
    ring = 63 / 64 * 100e6 * 2 / 100e9 + 63 * 10e-6
    assert r["accum"] == 1 and math.isclose(r["exposed_comm_s"], 2 * ring)
    effs = [scaling_model.step_model(n, **KW)["efficiency"] for n in scaling_model.gpu_counts(512)]
    assert all(a >= b for a, b in zip(effs, effs[1:])) and 0 < effs[-1] < 1
    hidden = scaling_model.step_model(64, **dict(KW, overlap=1.0))
    assert hidden["exposed_comm_s"] == pytest.approx(ring)  # the reduce-scatter fits under the backward


def test_scaling_model_cli(tmp_path, capsys):
    src = tmp_path / "tp.json"
    src.write_text(json.dumps({"mff": {"step_ms": 400.0, "params_m": 100.0}, "config": {"micro_batch": 256,
                                                                                         "precision": "bf16"},
                               "device": "test"}))
    out = tmp_path / "sm.json"
    res = scaling_model.main(["--from-json", str(src), "--json", str(out), "--overlap", "0.5"])
    assert "Assumptions" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [r["gpus"] for r in saved["curve"]] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert saved["curve"] == res["curve"] and len(saved["curves"]) == 3
    assert saved["inputs"]["params"] == 100e6 and saved["inputs"]["step_s"] == 0.4
    assert (tmp_path / "sm.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        scaling_model.main(["--step-ms", "100", "--params-m", "10", "--overlap", "2"])
    with pytest.raises(SystemExit, match="--step-ms"):
        scaling_model.main(["--params-m", "10", "--json", str(out)])


@pytest.mark.system
def test_scaling_measure_cpu_two_ranks(tmp_path):
    """1 vs 2 gloo ranks through the real ZeRO-2 engine (torchrun); about a minute on 2 cores."""
    out = tmp_path / "cpu.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "scaling_model.py"), "--measure-cpu", "--steps", "3",
           "--json", str(out)]
    p = forkserver.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["step_ms_1rank"] > 0 and res["step_ms_2ranks"] > 0 and res["allreduce_ms"] > 0
    assert res["runs"]["2"]["world_size"] == 2 and len(res["runs"]["2"]["step_s_per_rank"]) == 2
    assert res["gloo_allreduce_busbw_gbps"] > 0 and res["model_predicted_overhead"] > 0


def test_kernel_benchmark_cpu_smoke(tmp_path):
    """benchmarks/kernels.py --device cpu --quick: every op, Triton (interpreter) and eager, rows and bytes."""
    import kernels as kbench  # benchmarks/kernels.py (benchmarks/ is on sys.path above)
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--device", "cpu", "--quick",
                        "--out-dir", str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "kernels_quick.json").read_text())["results"]
    assert {(r["op"], r["impl"]) for r in rows} == {(op, impl) for op in kbench.OPS for impl in ("triton", "torch")}
    for r in rows:
        assert r["fwd+bwd"]["bytes"] > r["fwd"]["bytes"] > 0
        assert math.isclose(r["fwd"]["GB/s"], r["fwd"]["bytes"] / r["fwd"]["ms"] / 1e6)
    table = kbench.bytes_table(list(kbench.OPS), torch.bfloat16, 4800.0)
    assert all(f"| {op} |" in table for op in kbench.OPS) and "| vit_l |" in table


def test_data_benchmarks_device_path_on_cpu(tmp_path):
    """data_throughput.py --device and throughput.py --data run the device-decoding path (here on the CPU)."""
    jpegs, out = tmp_path / "jpegs", tmp_path / "dt.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--device", "cpu", "--images", "64",
           "--data-dir", str(jpegs), "--img-size", "32", "--batch", "8", "--device-batch", "16", "--repeats", "1",
           "--gpu-workers", "1", "--cpu-workers", "1", "--augs", "mff,mae", "--json", str(out)]
    p = forkserver.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    for aug in ("mff", "mae"):
        g, c = res[aug]["gpu_path"], res[aug]["cpu_path"]
        assert (g["workers"], g["batch"], c["workers"], c["batch"]) == (1, 16, 1, 8)
        assert g["img_s"] > 0 and c["img_s"] > 0 and g["cores"] > 0 and c["cores"] > 0
        assert res[aug]["gpu_over_cpu"] == round(g["img_s"] / c["img_s"], 2)  # as written: 2 decimals
    assert len(list(jpegs.rglob("*.jpg"))) == 64
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu", "--data", str(jpegs),
           "--decode", "gpu", "--workers", "1", "--no-baseline", "--steps", "3", "--warmup", "1", "--micro-batch", "8",
           "--json", str(out)]
    p = forkserver.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["decode"] == "gpu" and res["mff_synthetic"]["timed_steps"] == 3
    assert math.isclose(res["real_over_synthetic"], res["mff"]["img_per_s"] / res["mff_synthetic"]["img_per_s"])
    assert "real / synthetic" in (tmp_path / "tp.md").read_text()


# ------------------------------------------------------------------ the DeepSpeed paths
def test_path_model_charges_zero2_its_hooks_and_zero1_its_exposed_reduce():
    kw = dict(KW, overlap=1.0)
    free = scaling_model.path_model(64, tensors=263, hook_us=0.0, **kw)  # hooks free: overlap can only help
    assert free["zero1_over_zero2"] >= 1.0 and free["zero2_hooks_s"] == 0
    r = scaling_model.path_model(8, tensors=263, hook_us=15.0, **kw)  # 512 img/GPU: 2 micro steps of 256
    ring = 7 / 8 * 100e6 * 2 / 300e9 + 7 * 5e-6
    assert r["accum"] == 2 and math.isclose(r["zero2_hooks_s"], 2 * 263 * 15e-6)
    assert math.isclose(r["zero1_step_s"], 512 * 0.4 / 256 + 2 * ring)  # one reduce-scatter + one all-gather


def test_scaling_paths_table(tmp_path, capsys):
    res = scaling_model.main(["--paths", "--json", str(tmp_path / "p.json")])
    assert [(r["arch"], r["gpus"]) for r in res["rows"]][:3] == [("mff_vit_base_patch16", n) for n in (8, 64, 256)]
    assert len(res["rows"]) == 9 and res["overlap"] == 1.0
    assert "| ZeRO-1 / ZeRO-2 |" in (tmp_path / "p.md").read_text()


def test_ddp_overhead_two_ranks(tmp_path):
    """benchmarks/ddp_overhead.py on 2 gloo ranks: every trainer's row, collectives timed for ours."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "ddp_overhead.py"), "--steps", "2", "--warmup", "1",
           "--out-dir", str(tmp_path)]
    p = forkserver.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "ddp_overhead_w2.json").read_text())
    assert list(res["rows"]) == ["zero2", "zero1", "ddp"] and res["model_tensors"] == 265
    assert res["rows"]["ddp"]["ratio_to_ddp"] == 1.0 and res["rows"]["ddp"]["collective_ms"] is None
    for name in ("zero1", "zero2"):
        r = res["rows"][name]
        assert r["step_ms"] > 0 and 0 < r["collective_ms"] < r["step_ms"]
    assert len(res["raw"]) == 2 and len(res["raw"][0]["times"]["zero1"]) == 2


def test_checkpoint_benchmark_summary_and_table():
    """benchmarks/checkpoint.py's arithmetic: the pause per save from the loop times of a pair of runs, medians over
    the saves without the final one, the per-model options, the table's ratios."""
    import checkpoint as bench
    saves = [{"step": s, "stall_s": st, "write_s": 2.0, "bytes": 2**30} for s, st in ((1, 0.3), (2, 0.5), (3, 4.0))]
    pair = {"every": {"loop_s": 20.0}, "final": {"loop_s": 14.0, "step_time": 3.0}}
    r = bench.summarize(saves, pair, steps=3)
    assert r["pause_per_save_s"] == 3.0 and r["stall_s"] == 0.4 and r["mib_per_s"] == 512 and r["saves"] == 3
    assert bench.per_arch("vit-b=8,vit-l=2", "vit-l") == "2" and bench.per_arch("4", "vit-b") == "4"
    row = dict(r, bytes=2**30)
    md = bench.table({"runs": {"vit-b": {"sync": dict(row, pause_per_save_s=6.0, stall_s=5.0), "async": row}}})
    assert "| vit-b | sync / async | 2.0x | 12.5x |" in md
