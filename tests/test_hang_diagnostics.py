"""Hang diagnostics (docs/MULTINODE.md "When a rank dies or hangs"): the recipe's collective timeout
(distributed.timeout_s) and its environment override, the NCCL flight recorder's variables, and a resume that
changes the timeout. CPU only and fast: the eager NCCL init and a real flight-recorder dump need GPUs (not here)."""
import datetime
import glob
import os
import sys
from types import SimpleNamespace

import forkserver
import pytest

from mff_ds.common import UserError
from mff_ds.engine import compat, distributed, rundir
from mff_ds.engine.distributed import (DEFAULT_TIMEOUT_S, FR_BUFFER_VARS, FR_DUMP_FILE_VARS, FR_DUMP_ON_TIMEOUT_VAR,
                                       TIMEOUT_ENV, collective_timeout, flight_recorder_env)
from mff_ds.engine.recipe import RecipeError
from mff_ds.eval.recipe import load_eval_recipe
from mff_ds.pretrain.recipe import load_recipe

EVAL_PATHS = ["data.train_path=/x/train", "data.val_path=/x/val"]
FR_VARS = (*FR_BUFFER_VARS, FR_DUMP_ON_TIMEOUT_VAR, *FR_DUMP_FILE_VARS)


def demo(*sets):
    return load_recipe("demo", list(sets), world_size=1)


def marker(recipe):
    """A completion marker of `recipe` as the trainer writes it (tests/test_compat.py)."""
    return {"compat": recipe.compat_dict(), "recipe": recipe.to_dict(), "name": recipe.name, "zero_stage": 2,
            "world_size": 1}


# ------------------------------------------------------------------ the recipe key
def test_every_recipe_kind_has_the_timeout_with_its_documented_default():
    ft = load_eval_recipe("configs/finetune_demo.yaml", EVAL_PATHS, world_size=1)
    assert demo().distributed.timeout_s == ft.distributed.timeout_s == DEFAULT_TIMEOUT_S == 1800.0
    assert demo("distributed.timeout_s=90").distributed.timeout_s == 90.0
    assert demo("distributed.timeout_s=1e3").distributed.timeout_s == 1000.0  # YAML 1.1 reads 1e3 as a string


@pytest.mark.parametrize("value, why", [
    ("0", "expected > 0, got 0"), ("-5", "expected > 0, got -5"), ("abc", "expected float, got 'abc' (str)"),
    ("true", "expected float, got True (bool)"), (".inf", "expected a finite number, got inf")])
def test_a_bad_timeout_is_one_line_naming_the_key(value, why):
    with pytest.raises(RecipeError) as e:
        demo(f"distributed.timeout_s={value}")
    assert e.value.problems == [f"distributed.timeout_s: {why}"]


def test_an_unknown_key_of_the_section_is_named():
    with pytest.raises(RecipeError) as e:
        demo("distributed.timeout=60")
    assert e.value.problems == ["distributed.timeout: unknown key; expected one of ['timeout_s', 'peer_timeout_s']"]


# ------------------------------------------------------------------ the environment override
def test_the_environment_variable_wins_over_the_recipe():
    assert collective_timeout(None, {}) == datetime.timedelta(seconds=1800)
    assert collective_timeout(600.0, {}) == datetime.timedelta(seconds=600)
    assert collective_timeout(600.0, {TIMEOUT_ENV: ""}) == datetime.timedelta(seconds=600)  # empty: unset
    assert collective_timeout(600.0, {TIMEOUT_ENV: "10"}) == datetime.timedelta(seconds=10)
    assert collective_timeout(None, {TIMEOUT_ENV: "2.5"}) == datetime.timedelta(seconds=2.5)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "inf", "nan"])
def test_a_bad_environment_value_is_a_one_line_user_error(value):
    with pytest.raises(UserError) as e:
        collective_timeout(600.0, {TIMEOUT_ENV: value})
    assert str(e.value) == f"{TIMEOUT_ENV}: expected a positive number of seconds, got {value!r}"


def test_init_distributed_on_cpu_bounds_collectives_by_the_recipe_and_sets_no_flight_recorder(tmp_path):
    """A real (gloo, one rank) start in a child process, so this session keeps no process group with a short
    timeout: the world group and the default for DeepSpeed's groups take the timeout; on CPU no flight-recorder
    variable is set and nothing is created in the output dir."""
    code = f"""
import os, torch, torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from mff_ds.engine.distributed import init_distributed
init_distributed(7.0, {str(tmp_path / "out")!r})
world = c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
print(world.total_seconds(), c10d.default_pg_timeout.total_seconds(),
      sorted(k for k in os.environ if k in {FR_VARS!r}), os.path.exists({str(tmp_path / "out")!r}))
dist.destroy_process_group()
"""
    env = {k: v for k, v in os.environ.items() if k not in (TIMEOUT_ENV, *FR_VARS, "RANK", "WORLD_SIZE",
                                                            "SLURM_PROCID", "SLURM_NTASKS")}
    out = forkserver.run([sys.executable, "-c", code], env=dict(env, CUDA_VISIBLE_DEVICES=""), capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "7.0 7.0 [] False", out.stdout


def test_a_run_starts_its_process_group_with_the_recipes_timeout_and_output_dir(tmp_path, monkeypatch):
    """rundir.owns_output_dir starts the process group before the run (fit's setup only finds it started)."""
    calls = []
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda *a, **k: calls.append((a, k)) or SimpleNamespace(rank=0))
    monkeypatch.setattr(rundir, "claim", lambda output_dir, resume, rank: (None, resume))

    @rundir.owns_output_dir
    def fit(task, output_dir, resume="auto"):
        return resume

    task = SimpleNamespace(recipe=demo("distributed.timeout_s=42", "distributed.peer_timeout_s=20"))
    assert fit(task, str(tmp_path)) == "auto"
    assert calls == [((42.0, str(tmp_path), 20.0), {})]


# ------------------------------------------------------------------ the flight recorder
def test_the_flight_recorder_dumps_into_the_output_dir(tmp_path, monkeypatch):
    prefix = os.path.join(str(tmp_path), "nccl_trace", "rank_")
    assert flight_recorder_env({}, str(tmp_path), "2.14.1") == {
        "TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}
    # torch before 2.8 reads only the older name of the ring size
    assert flight_recorder_env({}, str(tmp_path), "2.5.1")["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000"
    assert "TORCH_FR_BUFFER_SIZE" not in flight_recorder_env({}, str(tmp_path), "2.5.1")
    # a relative output dir is made absolute: torch reads the prefix much later
    monkeypatch.chdir(tmp_path)
    relative = flight_recorder_env({}, "run", "2.14.1")["TORCH_FR_DUMP_TEMP_FILE"]
    assert relative == str(tmp_path / "run" / "nccl_trace" / "rank_")
    # no output dir: torch's own dump place
    assert flight_recorder_env({}, None, "2.14.1") == {"TORCH_FR_BUFFER_SIZE": "2000",
                                                       "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


@pytest.mark.parametrize("user, left", [
    ({"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}, FR_BUFFER_VARS),  # either name of a renamed variable counts
    ({"TORCH_FR_BUFFER_SIZE": "100"}, FR_BUFFER_VARS),
    ({"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}, (FR_DUMP_ON_TIMEOUT_VAR,)),
    ({"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_"}, FR_DUMP_FILE_VARS),
    ({"TORCH_FR_DUMP_TEMP_FILE": "/scratch/fr_"}, FR_DUMP_FILE_VARS)])
def test_variables_the_user_set_are_left_alone(tmp_path, user, left):
    env = flight_recorder_env(user, str(tmp_path), "2.14.1")
    assert not set(env) & set(left)
    assert set(env) == {"TORCH_FR_BUFFER_SIZE", FR_DUMP_ON_TIMEOUT_VAR, *FR_DUMP_FILE_VARS} - set(left)


def test_the_flight_recorder_follows_each_run_of_a_process_but_never_a_users_setting(tmp_path, monkeypatch):
    """What init_distributed does on CUDA before the process group starts (and again on later calls)."""
    for k in FR_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(distributed, "_fr_set", {})
    a, b = tmp_path / "a", tmp_path / "b"
    distributed._flight_recorder_on(str(a))
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(a / "nccl_trace" / "rank_") and (a / "nccl_trace").is_dir()
    distributed._flight_recorder_on(str(b))  # a later run in this process: its own output dir
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == \
        str(b / "nccl_trace" / "rank_") and (b / "nccl_trace").is_dir()
    monkeypatch.setenv("TORCH_FR_DUMP_TEMP_FILE", str(tmp_path / "mine_"))  # the user's, set in between
    monkeypatch.setenv("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
    distributed._flight_recorder_on(str(tmp_path / "c"))
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "mine_")
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0" and not (tmp_path / "c").exists()


def test_the_names_are_the_ones_the_installed_torch_reads():
    """The ring size and dump-on-timeout names from the installed torch's headers (the dump file prefix is read in
    a .cpp: TORCH_FR_DUMP_TEMP_FILE, then TORCH_NCCL_DEBUG_INFO_TEMP_FILE, in DebugInfoWriter::getWriter)."""
    import torch
    inc = os.path.join(os.path.dirname(torch.__file__), "include", "torch", "csrc", "distributed", "c10d")
    if not glob.glob(os.path.join(inc, "FlightRecorder.hpp")):
        pytest.skip("this torch ships no c10d headers")
    with open(os.path.join(inc, "FlightRecorder.hpp")) as f:
        assert '{"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"}' in f.read()
    with open(os.path.join(inc, "ProcessGroupNCCL.hpp")) as f:
        assert '"TORCH_NCCL_DUMP_ON_TIMEOUT"' in f.read()
    assert "TORCH_FR_BUFFER_SIZE" in flight_recorder_env({}, None)  # what this torch gets


def test_eager_nccl_init_is_asked_for_where_deepspeed_would_bind_the_device():
    """Only the decision: the eager NCCL init itself needs GPUs."""
    import torch
    gpu = torch.device("cuda", 1)
    assert distributed._eager_device(gpu, 2, "2.14.1") == gpu
    assert distributed._eager_device(gpu, 1, "2.14.1") is None       # one rank: nothing to reach (DeepSpeed #8248)
    assert distributed._eager_device(gpu, 2, "2.7.0") is None        # pytorch #153960
    assert distributed._eager_device(gpu, 2, "2.6.1+cu124") is None
    assert distributed._eager_device(gpu, 2, "2.7.1") == distributed._eager_device(gpu, 2, "2.6.0") == gpu
    assert distributed._eager_device(torch.device("cpu"), 2, "2.14.1") is None


# ------------------------------------------------------------------ resume
def test_a_resume_with_another_timeout_is_not_refused():
    then, now = demo(), demo("distributed.timeout_s=60")
    assert "distributed" not in then.compat_dict() and then.compat_hash() == now.compat_hash()
    out = compat.reconcile(marker(then), now, 2)
    assert (out.incompatible, out.kept) == ([], [])
    assert out.changed == ["distributed.timeout_s: checkpoint 1800.0 -> recipe 60.0"]
    assert now.distributed.timeout_s == 60.0  # the new value is what runs
    # a checkpoint written before the key existed
    old = marker(then)
    del old["recipe"]["distributed"]
    assert compat.reconcile(old, now, 2).incompatible == []
    assert compat.resume_recipe(marker(then), demo("distributed.timeout_s=60"), 2, lambda: 2).incompatible == []


def test_an_eval_resume_with_another_timeout_is_not_refused():
    then = load_eval_recipe("configs/finetune_demo.yaml", EVAL_PATHS, world_size=1)
    now = load_eval_recipe("configs/finetune_demo.yaml", EVAL_PATHS + ["distributed.timeout_s=60"], world_size=1)
    assert then.compat_hash() == now.compat_hash()
    out = compat.reconcile(marker(then), now, 2)
    assert (out.incompatible, out.kept) == ([], []) and "distributed.timeout_s: checkpoint 1800.0 -> recipe 60.0" in \
        out.changed
