"""precision amp-bf16 / amp-fp16 (DeepSpeed's torch_autocast: fp32 weights and optimizer, autocast in forward):
ZeRO-2 + amp-bf16 on 2 CPU ranks trains the demo, resumes bit-exactly and keeps every weight and optimizer state in
fp32, its loss tracks fp32 within AMP_BF16_LOSS_RTOL; amp-fp16's dynamic loss scale (ds_compat) behaves like torch's
GradScaler; the recipe refuses what cannot run."""
import copy
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forkserver
from mff_ds.common import COMPUTE_DTYPES, DTYPES
from mff_ds.engine import ds_compat
from mff_ds.engine.optim import PRECISION_FILES, build_deepspeed_engine, build_ds_config, norm_is_ours, precision_of
from mff_ds.engine.recipe import RecipeError
from mff_ds.pretrain.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
# The demo recipe at test size: 400 photographs, 32 per step on 2 ranks -> 12 steps per epoch, 2 epochs; the runs
# stop at STEPS (the schedule is that of 24 steps in every run, so a stopped and a resumed run follow the same lr).
SMALL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=4", "model.num_heads=2",
         "model.decoder_embed_dim=64", "model.decoder_depth=1", "model.decoder_num_heads=2", "model.out_indices=[1,3]",
         "data.num_workers=0", "schedule.epochs=2", "schedule.warmup_epochs=0.5", "batch.micro_batch=16",
         "logging.every_steps=1", "logging.image_every_steps=0", "logging.tensorboard=false",
         "logging.progress_bar=false", "checkpoint.every_steps=10"]
STEPS = 20
# |loss(amp-bf16) / loss(fp32) - 1| at every one of the 20 steps; measured max 1.9e-4 (step 16), mean 7.2e-5 on 2 CPU
# ranks (the test prints it)
AMP_BF16_LOSS_RTOL = 1e-3


def cpu():
    return torch.device("cpu")


def recipe(*sets):
    return load_recipe(DEMO, list(sets), world_size=1)


# ------------------------------------------------------------------ configs and refusals (no engine)
def test_each_precision_has_its_deepspeed_section_and_dtypes():
    for p in PRECISION_FILES:
        if p in ("fp16", "amp-fp16"):
            continue  # CUDA only: refused on CPU below
        cfg = build_ds_config(recipe(f"precision={p}"), 1, cpu())
        assert precision_of(cfg) == p
        on = [s for s in ("fp16", "bf16", "torch_autocast") if cfg[s]["enabled"]]
        assert on == {"fp32": [], "bf16": ["bf16"], "amp-bf16": ["torch_autocast"]}[p]
    amp = build_ds_config(recipe("precision=amp-bf16"), 1, cpu())["torch_autocast"]
    # no module's gradients are cast down for the reduction: they are reduced in fp32, as DDP does in the references
    assert amp == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert precision_of({"torch_autocast": {"enabled": True, "dtype": "float16"}}) == "amp-fp16"
    assert DTYPES["amp-bf16"] == DTYPES["amp-fp16"] == DTYPES["fp32"] == torch.float32
    assert (COMPUTE_DTYPES["amp-bf16"], COMPUTE_DTYPES["amp-fp16"]) == (torch.bfloat16, torch.float16)
    # ZeRO-0 with fp32 weights: no DeepSpeed optimizer wrapper, so the trainer takes the grad norm itself
    assert norm_is_ours({"zero_optimization": {"stage": 0}}, "amp-bf16")


@pytest.mark.parametrize("sets, expected", [
    (["precision=amp-fp16"], "precision: amp-fp16 needs a CUDA device"),
    (["precision=amp-fp16", "deepspeed.zero_stage=0"], "precision: amp-fp16 needs ZeRO stage 1 or 2"),
])
def test_amp_fp16_is_refused_where_it_cannot_run_with_one_line(sets, expected):
    with pytest.raises(RecipeError) as e:
        build_ds_config(recipe(*sets), 1, cpu())
    assert len(e.value.problems) == 1 and "\n" not in e.value.problems[0]
    assert e.value.problems[0].startswith(expected)


# ------------------------------------------------------------------ amp-fp16's loss scale, in process on CPU
@pytest.fixture
def dist_env():
    from mff_ds.engine.distributed import init_distributed
    saved = dict(os.environ)
    os.environ.setdefault("LOCAL_RANK", "0")
    init_distributed()
    yield
    ds_compat.forget_autocast_of_earlier_engines()  # later in-process engines must not see this one's autocast
    os.environ.clear()
    os.environ.update(saved)


def test_amp_fp16_scale_is_gradscalers_skips_overflow_and_grows_after_the_step(dist_env):
    """CPU autocast runs fp16 too, so the ZeRO-2 loss-scale logic is checked here (the recipe keeps amp-fp16 runs
    on CUDA; on a GPU machine this runs there). Adam with beta1 = 0 keeps the last unscaled gradient as exp_avg:
    the gradient the optimizer saw."""
    from mff_ds.engine.distributed import device_for
    dev = device_for(0)  # where DeepSpeed's accelerator autocasts
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(dev)
    ref = copy.deepcopy(model)
    ds = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 2, "parameter_alignment": True}, "steps_per_print": 1 << 30,
          "fp16": {"enabled": False}, "bf16": {"enabled": False},
          "torch_autocast": {"enabled": True, "dtype": "float16", "lower_precision_safe_modules": []}}
    engine, opt = build_deepspeed_engine(model, [{"params": list(model.parameters()), "weight_decay": 0.0}], ds,
                                         lr=1e-3, betas=(0.0, 0.999), device=dev)
    zero = engine.optimizer
    assert zero.torch_autocast_gradscaler is None and ds_compat.loss_scale(engine) == 2.0**16
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    zero.loss_scaler.scale_window = 1  # grow after every clean step but the first (GradScaler: growth_interval)
    x = torch.randn(4, 8, device=dev)

    def step(scale_loss=1.0):
        out = engine(x)
        assert out.dtype == torch.float16  # autocast in forward
        engine.backward(out.float().pow(2).mean() * scale_loss)
        engine.step()
        return ds_compat.loss_scale(engine)

    assert step() == 2.0**16
    ref.load_state_dict(engine.module.state_dict())  # the weights step 2 takes its gradient at
    assert step() == 2.0**17 and engine.skipped_steps == 0  # grew, after the step
    with torch.autocast(dev.type, dtype=torch.float16):
        ref(x).float().pow(2).mean().backward()
    g = torch.cat([p.grad.flatten() for p in ref.parameters()])
    seen = next(iter(opt.state.values()))["exp_avg"][: g.numel()]
    # unscaled by the scale its backward used (DeepSpeed alone would divide by the grown one: half of it)
    assert seen.dtype == torch.float32 and torch.allclose(seen, g, rtol=1e-2, atol=1e-6), (seen / g).median()
    before = [p.detach().clone() for p in engine.module.parameters()]
    # an overflow: the step is skipped on every rank, the scale halves, the weights stay
    assert step(float("inf")) == 2.0**16 and engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    # the scale is in the ZeRO state a checkpoint saves, and loads weights-only (mff_ds.engine.safe_load)
    from mff_ds.engine.safe_load import weights_only_loads
    buf = io.BytesIO()
    torch.save(zero.state_dict(), buf)
    buf.seek(0)
    with weights_only_loads():
        sd = torch.load(buf, map_location="cpu")
    assert sd["loss_scaler"].cur_scale == 2.0**16 and sd["dynamic_loss_scale"] is True


def _bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@pytest.mark.parametrize("precision, weights, grads", [("fp32", 4, 4), ("bf16", 2, 2), ("amp-bf16", 4, 4)])
def test_state_bytes_per_parameter_under_zero2(dist_env, precision, weights, grads):
    """What docs/ENGINE.md "Precision" states per parameter (one rank: the ZeRO-2 partitions are whole): the
    module's weights, the reduced gradient partition after backward, the fp32 master partition (a copy even when
    the weights are fp32) and Adam's two fp32 moments."""
    from mff_ds.models import build_model
    r = load_recipe(DEMO, [f"precision={precision}", "model.depth=2", "model.out_indices=[0,1]",
                           "model.decoder_depth=1", "batch.micro_batch=2", "batch.global_batch=2"], world_size=1)
    torch.manual_seed(0)
    model = build_model(r.model_cfg())
    engine, opt = build_deepspeed_engine(model, model.param_groups(0.05), build_ds_config(r, 1, cpu()), lr=1e-3,
                                         device=cpu())
    zero, n = engine.optimizer, sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = engine(torch.randn(2, 3, 64, 64, dtype=DTYPES[precision]))
    engine.backward(out.loss)
    g = _bytes([t for ts in zero.averaged_gradients.values() for t in ts or []])
    engine.step()
    w = _bytes(p for p in engine.module.parameters() if p.requires_grad)
    master = _bytes(zero.single_partition_of_fp32_groups)
    adam = _bytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    per = [round(b / n, 1) for b in (w, g, master, adam)]
    print(f"{precision}: bytes per parameter: weights, gradient partition, fp32 master, Adam = {per}")
    assert per == [weights, grads, 4, 8]


# ------------------------------------------------------------------ ZeRO-2 + amp-bf16 on the demo, 2 CPU ranks
def launch(out: Path, *sets, max_steps=STEPS, nproc=2, cuda=False):
    """A pretraining run of the small demo; on the CPU (also on a GPU machine: 2 ranks cannot share one GPU)
    unless `cuda`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "launch" / "pretrain.py"), "--config", DEMO, "--output-dir", str(out),
           "--max-steps", str(max_steps), *[a for s in (*SMALL, *sets) for a in ("--set", s)]]
    p = forkserver.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out: Path) -> dict:
    return {d["step"]: d["loss"] for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp32 and amp-bf16, 20 uninterrupted steps each."""
    tmp = tmp_path_factory.mktemp("amp")
    for p in ("fp32", "amp-bf16"):
        launch(tmp / p, f"precision={p}")
    return tmp


def test_amp_bf16_loss_stays_within_tolerance_of_fp32(runs):
    fp32, amp = losses(runs / "fp32"), losses(runs / "amp-bf16")
    assert sorted(fp32) == sorted(amp) == list(range(1, STEPS + 1))
    rel = [abs(amp[s] / fp32[s] - 1) for s in fp32]
    print(f"amp-bf16 vs fp32 over {STEPS} steps: max rel loss diff {max(rel):.2e} (step {rel.index(max(rel)) + 1}), "
          f"mean {sum(rel) / len(rel):.2e}; losses fp32 {fp32[1]:.4f} -> {fp32[STEPS]:.4f}, amp-bf16 "
          f"{amp[1]:.4f} -> {amp[STEPS]:.4f}")
    assert 0 < max(rel) < AMP_BF16_LOSS_RTOL  # autocast did compute in bf16 (not 0), and stayed close
    assert amp[STEPS] < 0.8 * amp[1]  # and it trains
    ds = json.loads((runs / "amp-bf16" / "ds_config.json").read_text())
    assert ds["torch_autocast"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_amp_bf16_keeps_weights_and_optimizer_state_in_fp32(runs):
    ck = runs / "amp-bf16" / "checkpoints" / f"global_step{STEPS}"
    model = torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert model and {v.dtype for v in model.values()} == {torch.float32}
    for rank in (0, 1):
        osd = torch.load(ck / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                         weights_only=False)["optimizer_state_dict"]
        masters = osd["single_partition_of_fp32_groups"]
        moments = [t for s in osd["base_optimizer_state"]["state"].values() for k, t in s.items()
                   if k in ("exp_avg", "exp_avg_sq")]
        assert masters and moments and {t.dtype for t in masters + moments} == {torch.float32}
        assert osd["loss_scaler"].cur_scale == 1.0  # no loss scale in bf16
    assert {v.dtype for v in load_file(str(runs / "amp-bf16" / "model_fp32.safetensors")).values()} == {torch.float32}


def test_amp_bf16_resumes_bit_exactly(runs, tmp_path):
    out = tmp_path / "out"
    launch(out, "precision=amp-bf16", max_steps=STEPS // 2)
    p = launch(out, "precision=amp-bf16")
    assert f"at step {STEPS // 2}" in p.stdout + p.stderr
    a, b = load_file(str(runs / "amp-bf16" / "model_fp32.safetensors")), load_file(str(out / "model_fp32.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = losses(runs / "amp-bf16"), losses(out)
    assert [la[s] for s in range(STEPS // 2 + 1, STEPS + 1)] == [lb[s] for s in range(STEPS // 2 + 1, STEPS + 1)]


# ------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
def test_amp_fp16_zero2_trains_with_a_dynamic_loss_scale_on_cuda(tmp_path):
    out = tmp_path / "out"
    launch(out, "precision=amp-fp16", max_steps=12, nproc=1, cuda=True)
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["loss_scale"] for r in m} <= {2.0**k for k in range(17)} and all(r["loss"] == r["loss"] for r in m)
    assert m[-1]["skipped_steps"] < 6 and m[-1]["loss"] < m[0]["loss"]  # a few skips while the scale settles
    model = torch.load(out / "checkpoints" / "global_step12" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {v.dtype for v in model["module"].values()} == {torch.float32}
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "float16", "lower_precision_safe_modules": []}


def test_amp_bf16_on_zero1_without_hooks_matches_zero2_and_resumes_bit_exactly(runs, tmp_path):
    """The ViT-S/B path (ZeRO-1 without gradient hooks) with amp-bf16: ZeRO-2's losses to 1e-6, and a run stopped
    halfway and resumed ends on the straight run's weights."""
    z1 = ("precision=amp-bf16", "deepspeed.config=ds_configs/zero1.json")
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch(straight, *z1)
    assert json.loads((straight / "ds_config.json").read_text())["zero_optimization"]["stage"] == 1
    a, b = losses(straight), losses(runs / "amp-bf16")
    assert max(abs(a[s] / b[s] - 1) for s in b) < 1e-6
    launch(split, *z1, max_steps=STEPS // 2)
    launch(split, *z1)
    wa, wb = load_file(str(straight / "model_fp32.safetensors")), load_file(str(split / "model_fp32.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(split) == a
