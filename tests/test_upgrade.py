"""Runs in flight across an upgrade (engine.compat): checkpoints written by an earlier mff-ds
(tests/fixtures/upgrade, README there) resume with this one. A default this version changed under a run, that the
user did not set by hand, keeps the run's saved value and says so in one warning; a value set by hand that differs
is refused; a ZeRO-2 run of a recipe that now ships ZeRO-1 keeps ZeRO-2."""
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "upgrade"))
import make  # noqa: E402  (the command lines that wrote the fixtures)

FIXTURES = Path(__file__).parent / "fixtures" / "upgrade"


def _copy(tmp_path, name):
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / name


def _marker(run: Path) -> Path:
    return run / "checkpoints" / "global_step2" / "mff_complete.json"


def _steps(run: Path):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "images_per_s" in json.loads(line)]


def _without(argv, *prefixes):
    """A fixture's command line without the --set items (and --max-steps) that start with `prefixes`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--max-steps":
            skip = True
        elif not any(a.startswith(f"--set={p}") for p in prefixes):
            out.append(a)
    return out


def _pretrain(argv, capsys):
    """The pretraining command line's load and train, in this process (its main() would end the process group)."""
    from mff_ds.engine.cli import run_or_report
    from mff_ds.pretrain.recipe import load_recipe
    from mff_ds.pretrain.task import train
    config, out, steps = (argv[argv.index(k) + 1] for k in ("--config", "--output-dir", "--max-steps"))
    overrides = [a[len("--set="):] for a in argv if a.startswith("--set=")]
    summary, code = run_or_report(lambda: train(load_recipe(config, overrides), out, max_steps=int(steps)))
    return code, capsys.readouterr().err


def test_a_zero2_run_of_a_recipe_that_now_ships_zero1_keeps_zero2(tmp_path, capsys, monkeypatch):
    run = _copy(tmp_path, "pretrain_zero2")
    monkeypatch.chdir(tmp_path)
    argv = _without(make.PRETRAIN[1:], "deepspeed.config")
    code, err = _pretrain(argv + ["--max-steps", "3"], capsys)
    assert code == 0, err
    assert "kept: deepspeed: the run's ZeRO stage 2 (this version's recipe uses stage 1" in err
    assert err.count("warning: resuming") == 1
    assert _steps(run) == [1, 2, 3]
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert yaml.safe_load((run / "recipe.yaml").read_text())["deepspeed"]["config"] == "ds_configs/zero2.json"
    # ZeRO-1 asked for by hand: refused, naming the fix, nothing trained
    code, err = _pretrain(argv + ["--max-steps", "4", "--set=deepspeed.config=ds_configs/zero1.json"], capsys)
    assert code == 2 and "saved with ZeRO stage 2, this run uses stage 1" in err and "Traceback" not in err
    assert _steps(run) == [1, 2, 3]


def _finetune(tmp_path, capsys, *extra, format_version=None, forget=()):
    """Resume the fixture's fine-tune, its init checkpoint moved here (the marker rewritten to name it), with the
    fixture's command line minus its hand-set warmup start factor, plus `extra`."""
    from mff_ds.eval.cli import train_main
    run = _copy(tmp_path, "finetune_digits")
    init = shutil.copy(FIXTURES / "init.safetensors", tmp_path / "init.safetensors")
    meta = json.loads(_marker(run).read_text())
    for record in (meta["compat"], meta["recipe"]):
        record["init"]["checkpoint"] = str(init)
    if format_version == 2:  # what mff-ds wrote before schedules named their reference
        meta["format_version"] = 2
        for record in (meta["compat"], meta["recipe"]):
            del record["schedule"]["reference"]
    for key in forget:  # a key a later version added: the old marker does not record it
        section, name = key.split(".")
        for record in (meta["compat"], meta["recipe"]):
            del record[section][name]
    _marker(run).write_text(json.dumps(meta))
    argv = _without(make.FINETUNE[1:], "schedule.warmup_start_factor")
    argv[argv.index("init.safetensors")] = str(init)
    code = train_main("finetune", argv + ["--max-steps", "3"] + list(extra))
    return run, code, capsys.readouterr().err


def test_a_finetune_keeps_the_saved_value_of_a_default_and_resumes_what_it_trains(tmp_path, capsys, monkeypatch):
    """The run's warmup start factor (0.5 then) differs from the recipe's now (1e-4), which the user did not set:
    kept and named. The recipe says 3 heads, the checkpoint's 2 train: the resume compares what trains."""
    monkeypatch.chdir(tmp_path)
    run, code, err = _finetune(tmp_path, capsys)
    assert code == 0, err
    assert "kept: schedule.warmup_start_factor: the run's 0.5 (the recipe as started now says 0.0001" in err
    assert "model.num_heads: the recipe says 3, the checkpoint has 2" in err and "incompatible" not in err
    assert _steps(run) == [1, 2, 3]
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["schedule"]["warmup_start_factor"] == 0.5 and saved["model"]["num_heads"] == 2


def test_a_finetune_of_the_old_schedule_format_resumes_naming_every_change(tmp_path, capsys, monkeypatch):
    """A format-2 marker (no schedule reference) that also lacks a key this version added: both named, the hand-
    set-then value kept, in one warning."""
    monkeypatch.chdir(tmp_path)
    run, code, err = _finetune(tmp_path, capsys, format_version=2, forget=["augment.val_interpolation"])
    assert code == 0, err
    assert err.count("warning: resuming") == 1
    assert "changed: schedule.reference: the checkpoint's: legacy" in err
    assert "changed: augment.val_interpolation: not recorded by the version that wrote the checkpoint; " \
           "continuing with the recipe's 'bicubic'" in err
    assert "kept: schedule.warmup_start_factor: the run's 0.5" in err
    assert _steps(run) == [1, 2, 3]


def test_a_finetune_changed_by_hand_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, code, err = _finetune(tmp_path, capsys, "--set", "schedule.warmup_start_factor=0.25")
    assert code == 2 and "schedule.warmup_start_factor: checkpoint 0.5 -> recipe 0.25" in err
    assert "Traceback" not in err and _steps(run) == [1, 2]
