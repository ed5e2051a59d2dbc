"""Recipe validation and overrides, lr schedule, DeepSpeed config merge, launcher environment detection."""
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

import forkserver

from mff_ds.engine import distributed as D
from mff_ds.engine.optim import build_ds_config
from mff_ds.engine.recipe import RecipeError, check
from mff_ds.pretrain.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["demo", "mff_vit-b_300e", "mff_vit-b_800e", "mae_vit-b_300e", "mae_vit-b_300e_mmpretrain", "mff_vit-s_300e",
           "mff_vit-l_800e"]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_validate(name):
    r = load_recipe(str(REPO / "configs" / f"{name}.yaml"), world_size=1 if name == "demo" else 8)
    assert r.name == name and r.data.source in ("demo", "imagefolder")


def test_reference_recipe_values():
    r300 = load_recipe(str(REPO / "configs" / "mff_vit-b_300e.yaml"), world_size=8)
    assert r300.lr() == pytest.approx(2.4e-3) and (r300.plan.micro, r300.plan.accum) == (512, 1)
    assert check(r300, 4) == [] and (r300.plan.world, r300.plan.micro, r300.plan.accum) == (4, 512, 2)
    assert (r300.optim.betas, r300.optim.weight_decay, r300.schedule.warmup_epochs) == ([0.9, 0.95], 0.05, 40)
    assert r300.model_cfg().out_indices == [0, 2, 4, 6, 8, 11] and r300.model_cfg().mask_ratio == 0.75
    r800 = load_recipe(str(REPO / "configs" / "mff_vit-b_800e.yaml"), world_size=8)
    assert (r800.schedule.epochs, r800.schedule.warmup_start_factor) == (800, 1e-9)
    mae = load_recipe(str(REPO / "configs" / "mae_vit-b_300e.yaml"), world_size=8)
    assert mae.model_cfg().out_indices == [11]
    d300, dmae = r300.to_dict(), mae.to_dict()
    for d in (d300, dmae):
        d.pop("name"), d.pop("model")
    assert d300 == dmae  # the MAE baseline differs only in the model's fusion
    mm = load_recipe(str(REPO / "configs" / "mae_vit-b_300e_mmpretrain.yaml"), world_size=8).to_dict()
    assert (mm.pop("name"), mm["seed"], mm["data"]["augment"]) == ("mae_vit-b_300e_mmpretrain", 0, "mae")
    assert mm.pop("model") == mae.to_dict()["model"]  # mmpretrain's MAE: RRC 0.2-1 bicubic and seed 0, else the same
    assert dict(mm, seed=dmae["seed"], data=dict(mm["data"], augment="mff")) == dmae


def test_bad_recipe_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "name": "bad", "colour": "red",
        "model": {"arch": "mff_vit_tiny_patch16", "depht": 3, "img_size": "big"},
        "data": {"source": "synthetic", "num_workers": -1, "shuffle": True},
        "batch": {"global_batch": 101, "micro_batch": 16},
        "optim": {"base_lr": "fast", "betas": [0.9]},
        "schedule": {"epochs": 10, "warmup_epochs": 20},
        "logging": {"every_steps": 0, "verbose": True},
    }))
    with pytest.raises(RecipeError) as e:
        load_recipe(str(bad), world_size=2)
    msg = str(e.value)
    expected = ["colour: unknown key", "data.shuffle: unknown key", "logging.verbose: unknown key",
                "optim.base_lr: expected float, got 'fast'", "model.depht: unknown key",
                "model.img_size: expected int, got 'big'", "data.num_workers: expected >= 0, got -1",
                "batch.global_batch: 101 images cannot be split exactly over 2 rank(s)",
                "optim.betas: expected two numbers",
                "schedule.warmup_epochs: expected in [0, epochs=10], got 20.0", "logging.every_steps: expected >= 1"]
    for item in expected:
        assert item in msg, (item, msg)
    assert len(e.value.problems) == len(expected), msg
    bad.write_text(yaml.safe_dump({
        "model": {"arch": "mff_vit_tiny_patch16", "img_size": 30, "patch_size": 8},
        "data": {"source": "synthetic", "num_workers": -1},
        "batch": {"global_batch": 101, "micro_batch": 16},
        "optim": {"betas": [0.9]}, "schedule": {"epochs": 10, "warmup_epochs": 20},
        "logging": {"every_steps": 0}, "deepspeed": {"config": "nope.json"},
    }))
    with pytest.raises(RecipeError) as e:
        load_recipe(str(bad), world_size=2)
    p = e.value.problems
    want = ["batch.global_batch: 101 images cannot be split exactly over 2 rank(s) with at most 16 per micro batch",
            "optim.betas:", "schedule.warmup_epochs:", "logging.every_steps:", "deepspeed.config:",
            "model.img_size: expected a multiple of patch_size 8",
            "data.num_workers:"]
    for w in want:
        assert any(x.startswith(w) for x in p), (w, p)
    assert len(p) == len(want), p


def test_three_problems_of_different_kinds_are_all_reported():
    with pytest.raises(RecipeError) as e:  # a wrong type, a batch no world of 8 can form, a negative epoch count
        load_recipe("demo", ["optim.weight_decay=lots", "batch.global_batch=100", "schedule.epochs=-3"], world_size=8)
    assert e.value.problems == [
        "batch.global_batch: 100 images cannot be split exactly over 8 rank(s) with at most 16 per micro batch; "
        "nearest: 96 (micro 12 x 1 accumulation, lr 0.0045) or 104 (micro 13 x 1 accumulation, lr 0.004875); "
        "expected one of those, or batch.global_batch_policy: nearest to take the closest",
        "optim.weight_decay: expected float, got 'lots' (str)",
        "schedule.epochs: expected > 0, got -3"], e.value.problems


@pytest.mark.parametrize("setting, problem", [
    ("optim.base_lr=inf", "optim.base_lr: expected a finite number, got 'inf'"),
    ("optim.base_lr=nan", "optim.base_lr: expected a finite number, got 'nan'"),
    ("optim.base_lr=.inf", "optim.base_lr: expected a finite number, got inf"),
    ("seed=-1", "seed: expected >= 0, got -1"),
    ("seed=4294967296", "seed: expected < 4294967296, got 4294967296"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction: expected <= 1, got 1.5"),
    ("logging.peak_tflops=0", "logging.peak_tflops: expected > 0, got 0"),
    ("checkpoint.export=yes please", "checkpoint.export: expected bool, got 'yes please' (str)"),
    ("batch.micro_batch=true", "batch.micro_batch: expected int, got True (bool)"),
])
def test_every_bound_is_checked(setting, problem):
    with pytest.raises(RecipeError) as e:
        load_recipe("demo", [setting], world_size=1)
    assert e.value.problems == [problem]


def test_files_the_recipe_reads_must_exist_and_parse(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{zero: 2")
    with pytest.raises(RecipeError) as e:
        load_recipe("demo", [f"deepspeed.config={bad}"], world_size=1)
    assert e.value.problems == [f"deepspeed.config: expected a readable JSON file, got '{bad}' (Expecting property "
                                f"name enclosed in double quotes: line 1 column 2 (char 1))"]
    bad.write_text("[1, 2]")
    with pytest.raises(RecipeError, match=r"deepspeed.config: expected a JSON object, got a list in"):
        load_recipe("demo", [f"deepspeed.config={bad}"], world_size=1)


def test_print_schema_validates_every_shipped_recipe(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    import json
    from mff_ds.eval.cli import train_main
    from mff_ds.pretrain.cli import main

    # PyYAML reads YAML 1.1, where 1.5e-4 (no dot) is a string; YAML 1.2 (editors, CI validators) reads a number,
    # as the recipe does
    class Yaml12(yaml.SafeLoader):
        pass
    Yaml12.add_implicit_resolver("tag:yaml.org,2002:float", __import__("re").compile(
        r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))

    def schema(run, *argv):
        out = tmp_path / "schema.json"
        with open(out, "w") as f, __import__("contextlib").redirect_stdout(f):
            assert run(["--print-schema", *argv]) == 0
        return json.loads(out.read_text())
    pretrain, finetune = schema(main), schema(lambda a: train_main("finetune", a))
    assert schema(lambda a: train_main("linprobe", a)) == finetune
    for path in sorted((REPO / "configs").glob("*.yaml")):
        tree = yaml.load(path.read_text(), Yaml12)
        eval_kind = path.name.startswith(("finetune_", "linprobe_"))
        jsonschema.validate(tree, finetune if eval_kind else pretrain)
        with pytest.raises(jsonschema.ValidationError):  # and the schema is not vacuous
            jsonschema.validate(dict(tree, batch={"micro_batch": 0}), finetune if eval_kind else pretrain)


def test_overrides_and_types(tmp_path):
    r = load_recipe(str(REPO / "configs" / "demo.yaml"), [
        "optim.base_lr=1e-3", "batch.micro_batch=8", "model.depth=4", "model.out_indices=[1,3]",
        "deepspeed.overrides.zero_optimization.reduce_bucket_size=1000", "precision=bf16"], world_size=1)
    assert r.optim.base_lr == 1e-3 and isinstance(r.optim.base_lr, float)  # YAML reads 1e-3 as a string
    assert r.batch.micro_batch == 8 and r.model_cfg().depth == 4 and r.precision == "bf16"
    assert r.deepspeed.overrides == {"zero_optimization": {"reduce_bucket_size": 1000}}
    with pytest.raises(RecipeError, match="precision: expected one of"):
        load_recipe(str(REPO / "configs" / "demo.yaml"), ["precision=fp8"], world_size=1)
    with pytest.raises(RecipeError, match="--set oops: expected dotted.key=value"):
        load_recipe(str(REPO / "configs" / "demo.yaml"), ["oops"], world_size=1)
    with pytest.raises(RecipeError, match="expected an existing YAML file"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_deepspeed_config_merge():
    r = load_recipe(str(REPO / "configs" / "mff_vit-b_300e.yaml"), ["batch.micro_batch=256"], world_size=8)
    cpu = torch.device("cpu")
    c = build_ds_config(r, 8, cpu)
    z = c["zero_optimization"]  # ViT-B: ZeRO-1 without gradient hooks (docs/ENGINE.md "Which path")
    assert (z["stage"], z["overlap_comm"], z["contiguous_gradients"], z["reduce_scatter"]) == (1, False, False, True)
    assert z["reduce_bucket_size"] > 0 and z["allgather_bucket_size"] > 0
    z2 = build_ds_config(load_recipe(str(REPO / "configs" / "mff_vit-l_800e.yaml"), world_size=8), 8, cpu)
    z2 = z2["zero_optimization"]  # ViT-L: ZeRO-2 with its overlapped reduce
    assert (z2["stage"], z2["overlap_comm"], z2["contiguous_gradients"], z2["reduce_scatter"]) == (2, True, True, True)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (4096, 256, 2)
    assert not c["bf16"]["enabled"] and not c["fp16"]["enabled"]  # auto on CPU = fp32
    with pytest.raises(RecipeError, match="fp16 needs a CUDA device"):
        build_ds_config(load_recipe(str(REPO / "configs" / "demo.yaml"), ["precision=fp16"], world_size=1), 1, cpu)
    fp16 = __import__("json").loads((REPO / "ds_configs" / "fp16.json").read_text())["fp16"]
    assert (fp16["loss_scale"], fp16["initial_scale_power"], fp16["loss_scale_window"], fp16["hysteresis"],
            fp16["min_loss_scale"]) == (0, 16, 500, 2, 1)
    b = build_ds_config(load_recipe(str(REPO / "configs" / "demo.yaml"), ["precision=bf16",
                        "deepspeed.zero_stage=0"], world_size=1), 1, cpu)
    assert b["bf16"]["enabled"] and b["zero_optimization"]["stage"] == 0
    with pytest.raises(RecipeError, match="deepspeed.overrides.train_batch_size: set by the recipe"):
        load_recipe(str(REPO / "configs" / "demo.yaml"), ["deepspeed.overrides.train_batch_size=8"], world_size=1)


def test_launcher_environments():
    d = D.detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.launcher) == (3, 8, 1, "n1", 1234, "env")
    s = D.detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                  "SLURM_JOB_NODELIST": "gpu[007-009,012],cpu1"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port, s.launcher) == \
        (5, 16, 1, "gpu007", 20000 + 4242, "slurm")
    assert D.first_host("node17") == "node17" and D.first_host("a-b[1,3-4]") == "a-b1"
    one = D.detect({})
    assert (one.rank, one.world_size, one.launcher) == (0, 1, "single") and one.master_port > 0


def test_cli_fails_fast_on_bad_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbatch: {global_batch: 11, micro_batch: 4}\nmodel: {arch: mff_vit_nano_patch16}\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    p = forkserver.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(bad), "--output-dir",
                        str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "batch.global_batch: 11 images cannot be split exactly over 2 rank(s)" in p.stderr
    assert "model.arch: unknown architecture 'mff_vit_nano_patch16'" in p.stderr
    assert not (tmp_path / "out").exists()  # no work started
