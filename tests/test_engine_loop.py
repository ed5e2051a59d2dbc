"""The one training loop is generic: a task that is neither pretraining nor classification (a linear regression on
an in-memory loader) runs through `fit` with its hooks called in order, its state checkpointed, and an interrupted
run resumed to the very weights of a straight one."""
import json
import time
from types import SimpleNamespace

import torch

from mff_ds.engine.recipe import BaseRecipe, CheckpointConfig, OptimConfig, validate
from mff_ds.engine.trainer import Task, fit


class Batches:
    """4 micro-batches of 4 (x, y) per epoch, fixed by (epoch, batch): what the loop asks of a loader."""
    def __init__(self):
        self.epoch, self.skip = 0, 0

    def __len__(self):
        return 4

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self):
        for b in range(self.skip, 4):
            g = torch.Generator().manual_seed(1000 * self.epoch + b)
            x = torch.randn(4, 3, generator=g)
            yield x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3


class Regression(Task):
    def __init__(self, recipe):
        super().__init__(recipe)
        self.events, self.epochs = [], []

    def build(self, run):
        self.events.append("build")
        return torch.nn.Linear(3, 1), Batches()

    def forward(self, engine, x, y):
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(engine(x.to(engine.device)), y.to(engine.device)))

    def log_extras(self, run, out, metrics):
        return {"bias": float(run.engine.module.bias.detach())}

    def after_step(self, run, out):
        self.events.append(f"step{run.step}")

    def end_epoch(self, run, epoch):
        self.events.append(f"epoch{epoch}")
        self.epochs.append(epoch)

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state):
        self.epochs = list(state.get("epochs", []))

    def finish(self, run, stopped_by):
        return {"weight": run.engine.module.weight.detach().cpu().clone(), "epochs": list(self.epochs)}


class RegressionRecipe(BaseRecipe):
    """A recipe of the engine's shared sections only: nothing of pretraining."""
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def compat_dict(self):
        return self.to_dict()


def recipe():
    # lr 4.0 * 8 / 256 = 0.125. 4 micro-batches of 4 per epoch, 2 per optimizer step -> 2 steps per epoch, 3 epochs; a checkpoint every step
    return validate(RegressionRecipe, {"seed": 7, "precision": "fp32", "deepspeed": {"zero_stage": 0},
                                       "batch": {"global_batch": 8, "micro_batch": 4},
                                       "optim": {"base_lr": 4.0, "weight_decay": 0.0},
                                       "schedule": {"epochs": 3, "warmup_epochs": 0},
                                       "checkpoint": {"every_steps": 1, "keep_last": 2, "export": False},
                                       "logging": {"every_steps": 2, "image_every_steps": 0, "progress_bar": False,
                                                   "tensorboard": False}}, world_size=1, source="test")


def test_any_task_runs_on_the_loop_with_its_hooks(tmp_path):
    task = Regression(recipe())
    s = fit(task, str(tmp_path / "run"), resume="none")
    assert s["step"] == s["total_steps"] == 6 and s["epochs"] == [0, 1, 2]
    assert task.events == ["build", "step1", "step2", "epoch0", "step3", "step4", "epoch1", "step5", "step6",
                           "epoch2"]
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logs] == [2, 4, 6] and all("bias" in m and "grad_norm" in m for m in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]  # it learns


def test_an_interrupted_task_resumes_to_the_weights_of_a_straight_run(tmp_path):
    straight = fit(Regression(recipe()), str(tmp_path / "straight"), resume="none")
    first = fit(Regression(recipe()), str(tmp_path / "resumed"), max_steps=3, resume="none")  # mid-epoch 1
    assert first["step"] == 3 and first["epochs"] == [0]
    again = Regression(recipe())
    second = fit(again, str(tmp_path / "resumed"), resume="auto")
    assert second["step"] == 6
    assert again.events[:2] == ["build", "step4"] and second["epochs"] == [0, 1, 2]  # task state from the checkpoint
    assert torch.equal(second["weight"], straight["weight"])


class SlowBatches(Batches):
    """The same batches, each arriving `delay` seconds late (a loader starved of workers or storage)."""
    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


class SlowRegression(Regression):
    def __init__(self, recipe, delay):
        super().__init__(recipe)
        self.delay = delay

    def build(self, run):
        return torch.nn.Linear(3, 1), SlowBatches(self.delay)


def test_input_wait_is_logged_and_a_starved_run_is_warned_about(tmp_path, capsys):
    """data_time (s per step waiting for the loader) and its fraction of the step time in every logging line; an
    input-bound stretch of 3 logging intervals gives one warning, a fed run none."""
    r = recipe().model_copy(update={"logging": recipe().logging.model_copy(update={"every_steps": 1})})
    fit(Regression(r), str(tmp_path / "fed"), resume="none")
    fed = [json.loads(line) for line in (tmp_path / "fed" / "metrics.jsonl").read_text().splitlines()]
    assert "input-bound" not in capsys.readouterr().err
    fit(SlowRegression(r, 0.05), str(tmp_path / "slow"), resume="none")
    slow = [json.loads(line) for line in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    err = capsys.readouterr().err
    assert len(slow) == 6 and all(m["data_time"] >= 2 * 0.05 for m in slow)  # 2 micro-batches per step
    assert all(0.5 < m["data_fraction"] <= 1.0 for m in slow)
    assert all(m["data_time"] < 0.05 for m in fed[1:])
    assert err.count("warning: input-bound: the loop waited for data") == 1 and "data.num_workers" in err
