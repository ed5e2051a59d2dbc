"""The engine-speed settings (issue: a ZeRO-2 step as cheap as a plain loop): DeepSpeed defaults chosen by world
size, every weight 16-byte aligned, the grad norm taken by the trainer on logging steps only, host syncs per step
independent of depth, and `deepspeed.compile` matching eager."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from mff_ds.engine.optim import MULTI_RANK_BUCKET, build_deepspeed_engine, build_ds_config, grad_norm  # noqa: E402
from mff_ds.engine.recipe import RecipeError  # noqa: E402
from mff_ds.pretrain.recipe import from_dict  # noqa: E402
from mff_ds.models import build_model  # noqa: E402
import forkserver
from conftest import tiny_recipe  # noqa: E402

# odd widths on purpose: 36-d (3 heads), 20-d decoder, 3 fused levels -> 3 fusion logits, 12-element biases
ODD = dict(arch="mff_vit_tiny_patch16", img_size=24, patch_size=8, embed_dim=36, depth=3, num_heads=3,
           decoder_embed_dim=20, decoder_depth=1, decoder_num_heads=2, out_indices=[0, 1, 2], kernels="torch")


def recipe(world=1, **sections):
    d = {"model": dict(ODD), "batch": {"global_batch": 4 * world, "micro_batch": 4}}
    d.update(sections)
    return from_dict(d, world_size=world, source="test")


@pytest.fixture(scope="module")
def dist_env():
    from mff_ds.engine.distributed import init_distributed
    saved = dict(os.environ)
    os.environ.setdefault("LOCAL_RANK", "0")
    init_distributed()
    yield
    os.environ.clear()
    os.environ.update(saved)


def engine_for(r, model_over=None, ds_over=None, seed=0):
    ds = build_ds_config(r, 1, torch.device("cpu"))
    for k, v in (ds_over or {}).items():
        ds["zero_optimization"][k] = v
    torch.manual_seed(seed)
    model = build_model(r.model_cfg() if not model_over else r.model_cfg().__class__(
        **dict(r.model_cfg().to_dict(), **model_over)))
    engine, _ = build_deepspeed_engine(model, model.param_groups(0.05), ds, lr=1e-3, device=torch.device("cpu"))
    return engine


def test_zero2_defaults_follow_world_size_and_yield_to_the_recipe():
    one = build_ds_config(recipe(1), 1, torch.device("cpu"))["zero_optimization"]
    many = build_ds_config(recipe(8), 8, torch.device("cpu"))["zero_optimization"]
    assert one["stage"] == many["stage"] == 2 and one["parameter_alignment"] and many["parameter_alignment"]
    assert not one["overlap_comm"] and not one["contiguous_gradients"] and one["reduce_bucket_size"] >= 6e8
    assert many["overlap_comm"] and many["contiguous_gradients"] and many["reduce_bucket_size"] == MULTI_RANK_BUCKET
    assert not one["compute_grad_norm"]  # no clipping: the trainer takes the norm on logging steps
    clipped = build_ds_config(recipe(1, optim={"grad_clip": 1.0}), 1, torch.device("cpu"))
    assert clipped["zero_optimization"]["compute_grad_norm"] and clipped["gradient_clipping"] == 1.0
    mine = build_ds_config(recipe(1, deepspeed={"overrides": {"zero_optimization": {"overlap_comm": True}}}), 1,
                           torch.device("cpu"))
    assert mine["zero_optimization"]["overlap_comm"]  # the recipe's own value wins
    assert build_ds_config(recipe(1), 1, torch.device("cpu"))["timers"]["throughput"]["enabled"] is False


def test_zero1_installs_no_gradient_hook_and_zero2_one_per_parameter(dist_env):
    """The ViT-S/B path (ds_configs/zero1.json + engine_defaults) leaves backward to autograd alone; ZeRO-2 hooks
    every parameter (benchmarks/ddp_overhead.py measures what that costs)."""
    from mff_ds.engine import ds_compat
    one, two = engine_for(recipe(1, deepspeed={"zero_stage": 1})), engine_for(recipe(1))
    n = sum(1 for p in two.module.parameters() if p.requires_grad)
    assert ds_compat.gradient_hooks(one.optimizer) == 0 and ds_compat.gradient_hooks(two.optimizer) == n
    z1 = build_ds_config(recipe(8, deepspeed={"zero_stage": 1}), 8, torch.device("cpu"))["zero_optimization"]
    assert (z1["stage"], z1["overlap_comm"], z1["contiguous_gradients"]) == (1, False, False)
    assert z1["reduce_bucket_size"] == MULTI_RANK_BUCKET and not z1["compute_grad_norm"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_single_rank_zero1_skips_the_reduce_with_the_same_weights(dist_env, precision):
    """One rank, ZeRO-1, 2 accumulation steps: without DeepSpeed's per-parameter reduce over the one rank the
    weights are bit-identical to those with it."""
    from mff_ds.engine import ds_compat
    r = recipe(1, precision=precision, deepspeed={"zero_stage": 1}, batch={"global_batch": 8, "micro_batch": 4})
    ours, theirs = engine_for(r), engine_for(r)
    assert "reduce_gradients" in vars(ours.optimizer)  # the patch is in place
    ds_compat.restore_view_refresh(theirs.optimizer)
    g = torch.Generator().manual_seed(2)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for _ in range(6):
        x = torch.randn(4, 3, 24, 24, generator=g).to(dtype)
        noise = torch.rand(4, 9, generator=g)
        for e in (ours, theirs):
            e.backward(e(x, noise=noise).loss)
            e.step()
    assert ours.global_steps == theirs.global_steps == 3
    for (n, a), (_, b) in zip(ours.module.named_parameters(), theirs.module.named_parameters()):
        assert torch.equal(a, b), n
    moved = engine_for(r)
    assert any(not torch.equal(a, b) for a, b in zip(ours.module.parameters(), moved.module.parameters()))


def test_deepcompile_is_refused_in_one_line_off_cuda():
    with pytest.raises(RecipeError, match="deepspeed.deepcompile: DeepSpeed's DeepCompile runs on CUDA devices only"):
        build_ds_config(recipe(1, deepspeed={"deepcompile": True}), 1, torch.device("cpu"))
    with pytest.raises(RecipeError, match="expected deepspeed.zero_stage 1 or 2, got stage 0"):
        build_ds_config(recipe(1, deepspeed={"deepcompile": True, "zero_stage": 0}), 1, torch.device("cuda"))


def misaligned(engine):
    return [n for n, p in engine.module.named_parameters() if p.data_ptr() % 16]


@pytest.mark.parametrize("arch", ["mff", "mae"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_every_weight_is_16_byte_aligned(dist_env, arch, precision, stage):
    model = dict(ODD, out_indices=[2]) if arch == "mae" else dict(ODD)
    r = recipe(1, model=model, precision=precision, deepspeed={"zero_stage": stage})
    assert misaligned(engine_for(r)) == []


def test_alignment_test_can_fail(dist_env):
    """Without parameter_alignment, MFF's odd-sized fusion logits shift the weights after them."""
    r = recipe(1, precision="bf16")
    assert misaligned(engine_for(r, ds_over={"parameter_alignment": False}))


@pytest.mark.parametrize("stage", [1, 2])
def test_trainer_grad_norm_equals_deepspeeds_and_training_is_unchanged(dist_env, stage):
    r = recipe(1, deepspeed={"zero_stage": stage})
    ours = engine_for(r)  # compute_grad_norm off (no clipping)
    theirs = engine_for(r, ds_over={"compute_grad_norm": True})
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 3, 24, 24, generator=g)
        noise = torch.rand(4, 9, generator=g)
        for e in (ours, theirs):
            e.backward(e(x, noise=noise).loss)
        mine = grad_norm(ours).item()
        ours.step()
        theirs.step()
        assert ours.get_global_grad_norm() is None
        assert mine == pytest.approx(float(theirs.get_global_grad_norm()), rel=1e-6)
    for (n, a), (_, b) in zip(ours.module.named_parameters(), theirs.module.named_parameters()):
        assert torch.equal(a, b), n


def tiny(depth: int, export: bool = False, log_every: int = 1000) -> str:
    """One process: 2 micro-batches per step, 6 steps, one log + checkpoint at the end."""
    return tiny_recipe(seed=3, model={"depth": depth, "decoder_depth": depth, "out_indices": [0, -1]},
                       data={"num_samples": 96}, schedule={"warmup_epochs": 0},
                       checkpoint={"every_steps": 0, "keep_last": 1, "export": export},
                       logging={"every_steps": log_every})


SYNCS = """
import json, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
from host_syncs import SyncCounter
from mff_ds.pretrain.recipe import load_recipe
from mff_ds.engine.trainer import fit
from mff_ds.pretrain import PretrainTask
marks = []
class Marked(PretrainTask):
    def forward(self, engine, images, labels):  # a mark per micro-batch: the syncs between marks are one iteration
        marks.append(counter.total)
        return super().forward(engine, images, labels)
recipe = load_recipe(sys.argv[2], sys.argv[3:], world_size=1)
with SyncCounter() as counter:
    fit(Marked(recipe), sys.argv[1])
print("MARKS", json.dumps(marks))
"""


def child_env(threads: int) -> dict:
    """This module's in-process engines set the distributed variables: a child must start its own group."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS=str(threads))


def syncs_per_iteration(tmp: Path, depth: int, *sets) -> list:
    cfg = tmp / f"d{depth}.yaml"
    cfg.write_text(tiny(depth))
    (tmp / "syncs.py").write_text(SYNCS.format(repo=str(REPO), bench=str(REPO / "benchmarks")))
    p = forkserver.run([sys.executable, str(tmp / "syncs.py"), str(tmp / f"out{depth}"), str(cfg), *sets],
                       capture_output=True, text=True, timeout=180, env=child_env(1))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    marks = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("MARKS"))[6:])
    return [b - a for a, b in zip(marks, marks[1:])]  # 11 iterations between 12 forwards, none a logging step


@pytest.mark.parametrize("precision,stage", [("fp32", 0), ("bf16", 2)])
def test_host_syncs_per_step_do_not_grow_with_depth(tmp_path, precision, stage):
    sets = (f"precision={precision}", f"deepspeed.zero_stage={stage}")
    shallow, deep = syncs_per_iteration(tmp_path, 2, *sets), syncs_per_iteration(tmp_path, 6, *sets)
    print(f"{precision} ZeRO-{stage}: syncs per micro-batch, depth 2: {shallow}; depth 6: {deep}")
    assert len(shallow) == len(deep) == 11
    assert shallow == deep and max(deep) <= 8


COMPILE = """
import json, sys
import torch._inductor.config as ic
ic.fallback_random = True  # inductor's own RNG would draw other masks than eager; the comparison needs the same
sys.path.insert(0, {repo!r})
from mff_ds.pretrain.recipe import load_recipe
from mff_ds.pretrain import train
recipe = load_recipe(sys.argv[2], sys.argv[3:], world_size=1)
print("SUMMARY", json.dumps(train(recipe, sys.argv[1], resume="none")))
"""


@pytest.mark.slow
def test_compiled_engine_trains_like_eager_with_the_same_checkpoint_keys(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny(2, export=True, log_every=1))
    (tmp_path / "run.py").write_text(COMPILE.format(repo=str(REPO)))
    outs = {}
    for name, sets in (("eager", []), ("compiled", ["deepspeed.compile=true"])):
        p = forkserver.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / name), str(cfg),
                            "batch.global_batch=8", "data.num_samples=32", *sets],
                           capture_output=True, text=True, timeout=600, env=child_env(2))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        outs[name] = tmp_path / name
    m = {k: [json.loads(l) for l in (v / "metrics.jsonl").read_text().splitlines()] for k, v in outs.items()}
    assert len(m["eager"]) == len(m["compiled"]) == 4
    for a, b in zip(m["eager"], m["compiled"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    from safetensors.torch import load_file
    we, wc = (load_file(str(v / "model_fp32.safetensors")) for v in (outs["eager"], outs["compiled"]))
    assert we.keys() == wc.keys() and not any("_orig_mod" in k for k in wc)
    assert max((we[k] - wc[k]).abs().max().item() for k in we) < 1e-5
    states = [torch.load(v / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)
              for v in outs.values()]
    assert states[0]["module"].keys() == states[1]["module"].keys()


def test_checkpoint_without_alignment_resumes_with_its_own_layout(tmp_path):
    """A marker from before parameter_alignment (no such key, unaligned flat buffers) resumes with a warning."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_recipe(seed=3, model={"depth": 2, "decoder_depth": 2, "out_indices": [0, -1]},
                               data={"num_samples": 96}, schedule={"warmup_epochs": 0},
                               checkpoint={"every_steps": 2, "keep_last": 2}))
    out = tmp_path / "out"

    def launch(*args):
        cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(cfg), "--output-dir", str(out),
               "--set", "precision=bf16", *args]
        p = forkserver.run(cmd, capture_output=True, text=True, timeout=180, env=child_env(1))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p
    launch("--max-steps", "4", "--set", "deepspeed.overrides.zero_optimization.parameter_alignment=false")
    marker = out / "checkpoints" / "global_step4" / "mff_complete.json"
    meta = json.loads(marker.read_text())
    assert meta.pop("parameter_alignment") is False and meta.pop("format_version") == 4
    for record in (meta["compat"], meta["recipe"]):
        assert record["schedule"].pop("reference") == "mmengine"
    marker.write_text(json.dumps(meta))  # as an older mff-ds wrote it (checkpoint format 1)
    p = launch()
    assert "parameter_alignment=false; resuming with that layout" in p.stderr
    # its lr schedule followed no reference exactly: the change is named, not refused (tests/test_schedule.py)
    assert "changed: schedule.reference: the checkpoint's: legacy (mff-ds before 2026-12-04" in p.stderr
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6


def test_decode_device_may_change_on_resume():
    """data.decode moves the same crops and flips to another device: a compatible change, listed, not refused."""
    from mff_ds.engine.compat import reconcile
    old = recipe(1, data={"source": "synthetic", "num_samples": 8, "decode": "cpu"})
    new = recipe(1, data={"source": "synthetic", "num_samples": 8, "decode": "gpu"})
    meta = {"compat": old.compat_dict(), "recipe": old.to_dict()}
    result = reconcile(meta, new, 2)
    assert result.incompatible == [] and any(c.startswith("data.decode") for c in result.changed)


def test_zero_step_keeps_parameters_on_the_flat_buffer_and_follows_a_replaced_one(dist_env):
    """The per-step view refresh is skipped while the layout is intact, and runs when DeepSpeed swaps a buffer."""
    e = engine_for(recipe(1, precision="bf16"))
    opt = e.optimizer
    x = torch.randn(4, 3, 24, 24, dtype=torch.bfloat16)

    def on_flat(i):
        flat = opt.bit16_groups_flat[i]
        lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        return all(lo <= p.data_ptr() < hi for p in opt.bit16_groups[i])
    before = [p.detach().clone() for p in e.module.parameters()]
    e.backward(e(x).loss)
    e.step()  # refresh skipped: the parameters must still be the (updated) slices of the flat buffers
    assert all(on_flat(i) for i in range(len(opt.bit16_groups)))
    # (matrices: a first Adam step of lr 1e-3 is below bf16 resolution for the weights initialised to 1)
    assert all(not torch.equal(a, p) for a, p in zip(before, e.module.parameters()) if p.requires_grad and p.dim() > 1)
    opt.bit16_groups_flat[0] = opt.bit16_groups_flat[0].clone()  # a buffer swapped, as offload/reload would
    assert not on_flat(0)
    e.backward(e(x).loss)
    e.step()
    assert on_flat(0)  # the original refresh ran and re-pointed the parameters


def test_compile_mode_is_checked_with_the_recipe():
    from mff_ds.engine.recipe import RecipeError
    with pytest.raises(RecipeError, match=r"deepspeed.compile_mode: expected one of .*got 'reduce-overhead'"):
        recipe(1, deepspeed={"compile": True, "compile_mode": "reduce-overhead"})
