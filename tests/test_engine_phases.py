"""Where the time goes (issue #36): the start-up timeline recorded once per run, and the forward / backward / optimizer
time of every logging interval, which with data_time make up step_time; read without host-device syncs."""
import json
import os

import pytest
import torch

from mff_ds.common import STARTUP
from mff_ds.engine import phases
from mff_ds.engine.phases import ORDER, PhaseTimer, StartupClock, process_start, startup_line, startup_record
from mff_ds.engine.trainer import fit
from test_engine_loop import Batches, Regression, recipe

WIDTH = 256


class WideBatches(Batches):
    """The same 4 micro-batches per epoch, of WIDTH features."""
    def __iter__(self):
        for b in range(self.skip, 4):
            g = torch.Generator().manual_seed(1000 * self.epoch + b)
            x = torch.randn(4, WIDTH, generator=g)
            yield x, x[:, :1] - 2 * x[:, 1:2]


class Wide(Regression):
    """A model large enough (4.7 M weights) that the loop's bookkeeping is small beside its steps."""
    def build(self, run):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(WIDTH, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                   torch.nn.ReLU(), torch.nn.Linear(2048, 1)), WideBatches()

    def log_extras(self, run, out, metrics):
        return {}

    def finish(self, run, stopped_by):
        return {}


def wide_recipe():
    r = recipe()  # 3 epochs of 2 optimizer steps of 2 micro-batches; a logging line every 2 steps
    return r.model_copy(update={"checkpoint": r.checkpoint.model_copy(update={"every_steps": 0}),
                                "optim": r.optim.model_copy(update={"base_lr": 0.01})})


def lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_startup(logs, resumed=False):
    records = [m["startup"] for m in logs if "startup" in m]
    assert len(records) == 1 and "startup" in logs[0]  # with the first metrics line
    rec = records[0]
    want = [k for k in ORDER if k != "restore" or resumed]
    assert list(rec["phases"]) == want, rec
    assert all(v >= 0 for v in rec["phases"].values())
    assert rec["total_s"] == pytest.approx(sum(rec["phases"].values()), rel=1e-9)
    assert rec["slowest_rank"] == 0 and rec["per_rank_total_s"] == [rec["total_s"]]
    return rec


def test_startup_once_and_phases_make_up_the_step_time(tmp_path, capsys):
    fit(Wide(wide_recipe()), str(tmp_path / "run"), resume="none")
    logs = lines(tmp_path / "run")
    assert [m["step"] for m in logs] == [2, 4, 6] and all("loss" in m and "lr" in m for m in logs)
    rec = check_startup(logs)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("start-up ")]
    assert printed == [startup_line(rec)] and "(slowest: rank 0): imports " in printed[0]
    keys = ("data_time", "forward_time", "backward_time", "optimizer_time", "step_time")
    assert all(m[k] >= 0 for m in logs for k in keys)
    assert all(m["forward_time"] > 0 and m["backward_time"] > 0 and m["optimizer_time"] > 0 for m in logs)
    parts = sum(m["data_time"] + m["forward_time"] + m["backward_time"] + m["optimizer_time"] for m in logs)
    whole = sum(m["step_time"] for m in logs)
    assert 0.9 < parts / whole <= 1.0 + 1e-6, (parts, whole, logs)


def test_a_resumed_run_records_its_startup_with_the_restore_and_a_quiet_one_prints_none(tmp_path, capsys):
    task = Regression(recipe())
    task.quiet = True
    fit(task, str(tmp_path / "run"), max_steps=3, resume="none")
    fit(Regression(recipe()), str(tmp_path / "run"), resume="auto")
    logs = lines(tmp_path / "run")
    assert [m["step"] for m in logs] == [2, 3, 4, 6]
    check_startup(logs[:2])
    assert check_startup(logs[2:], resumed=True)["phases"]["restore"] > 0
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("start-up ") for line in printed) == 1  # the resumed, not quiet, run


# ------------------------------------------------------------------ PhaseTimer
class FakeEvent:
    """A CUDA event stand-in: record() takes the fake clock, query() says whether the device got there; reading an
    event that is not done fails as CUDA's elapsed_time does, and nothing may wait for one."""
    clock, done, made = 0.0, True, 0

    def __init__(self):
        FakeEvent.made += 1
        self.t, self.ready = None, None

    def record(self):
        self.t, self.ready = FakeEvent.clock, FakeEvent.done

    def query(self):
        return self.ready

    def elapsed_time(self, end):
        assert self.ready and end.ready, "elapsed_time of an event not done"
        return 1000.0 * (end.t - self.t)

    def synchronize(self):
        raise AssertionError("PhaseTimer waited for the device")


def micro_batch(timer, forward, backward, optimizer):
    timer.start()
    for phase, seconds in zip(PhaseTimer.PHASES, (forward, backward, optimizer)):
        FakeEvent.clock += seconds
        timer.lap(phase)


def test_phase_timer_reads_what_is_done_and_the_rest_one_interval_later(monkeypatch):
    monkeypatch.setattr(FakeEvent, "done", True)
    timer = PhaseTimer(event=FakeEvent)
    micro_batch(timer, 1.0, 2.0, 0.5)
    micro_batch(timer, 1.0, 2.0, 0.5)  # one optimizer step of 2 micro-batches, done
    FakeEvent.done = False
    micro_batch(timer, 4.0, 4.0, 4.0)  # the next step's micro-batch: the device is not there yet
    assert timer.take(steps=1) == {"forward_time": 2.0, "backward_time": 4.0, "optimizer_time": 1.0}
    assert timer.take(steps=1) == {"forward_time": 0.0, "backward_time": 0.0, "optimizer_time": 0.0}
    for events in timer.pending:  # the device catches up
        for e in events:
            e.ready = True
    assert timer.take(steps=2) == {"forward_time": 2.0, "backward_time": 2.0, "optimizer_time": 2.0}
    made = FakeEvent.made
    FakeEvent.done = True
    for _ in range(5):
        micro_batch(timer, 1.0, 1.0, 1.0)
        timer.take(steps=1)
    assert FakeEvent.made == made  # the events come back to the pool


def test_phase_timer_keeps_order_and_drops_a_micro_batch_that_raised(monkeypatch):
    monkeypatch.setattr(FakeEvent, "done", True)
    timer = PhaseTimer(event=FakeEvent)
    timer.start()
    FakeEvent.clock += 9.0
    timer.lap("forward")  # the backward raised: the loop never closes this micro-batch
    micro_batch(timer, 1.0, 1.0, 1.0)
    FakeEvent.done = False
    micro_batch(timer, 1.0, 1.0, 1.0)
    FakeEvent.done = True
    micro_batch(timer, 1.0, 1.0, 1.0)  # done, but behind one that is not: read with it, later
    assert timer.take(steps=1) == {"forward_time": 1.0, "backward_time": 1.0, "optimizer_time": 1.0}
    assert len(timer.pending) == 2
    timer.reset()
    assert timer.take(steps=1)["forward_time"] == 0.0


def test_phase_timer_on_the_host_times_the_phases():
    timer = PhaseTimer(torch.device("cpu"))
    timer.start()
    for phase in PhaseTimer.PHASES:
        timer.lap(phase)
    got = timer.take(steps=1)
    assert set(got) == {"forward_time", "backward_time", "optimizer_time"} and all(0 <= v < 1 for v in got.values())


# ------------------------------------------------------------------ start-up clock, /proc
def fake_proc(root, ticks, comm="python3 (worker) x", uptime="1000.50 900.00\n", btime=True):
    (root / "self").mkdir(parents=True)
    fields = ["S"] + [str(i) for i in range(4, 22)] + [str(ticks), "123", "456"]  # fields 3..24
    (root / "self" / "stat").write_text(f"4242 ({comm}) " + " ".join(fields) + "\n")
    if uptime is not None:
        (root / "uptime").write_text(uptime)
    (root / "stat").write_text("cpu  1 2 3\n" + ("btime 1700000000\n" if btime else "") + "processes 9\n")
    return str(root)


def test_process_start_reads_field_22_after_the_command_name(tmp_path, monkeypatch):
    hz = os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(phases.time, "time", lambda: 5000.0)
    # started 990 s after boot, 1000.5 s of uptime: 10.5 s ago
    assert process_start(fake_proc(tmp_path / "a", 990 * hz)) == pytest.approx(5000.0 - 10.5)
    # no /proc/uptime: boot time from btime
    assert process_start(fake_proc(tmp_path / "b", 990 * hz, uptime=None)) == pytest.approx(1700000000 + 990)
    assert process_start(fake_proc(tmp_path / "c", 990 * hz, uptime=None, btime=False)) is None
    assert process_start(str(tmp_path / "nothing")) is None
    real = process_start()
    if os.path.exists("/proc/self/stat"):  # this process started before now, after the boot
        import time
        assert real is not None and 0 <= time.time() - real < 24 * 3600 * 365


def test_startup_clock_gives_lower_layers_their_own_phase(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(phases.time, "time", lambda: now[0])
    monkeypatch.setattr(phases, "_FIRST_RUN", [False])  # not the process's first run: no imports before it
    monkeypatch.setitem(STARTUP, "data_index", 7.0)  # an earlier run's index
    clock = StartupClock()
    now[0] += 2.0
    clock.mark("recipe_check")
    now[0] += 10.0
    STARTUP["data_index"] += 6.0  # the data layer's index, inside the build
    clock.mark("model_build")
    now[0] += 3.0
    clock.mark("first_batch")
    now[0] += 4.0
    clock.mark("first_step")
    clock.move(1.0, "first_step", "first_batch")  # a later micro-batch's wait
    t = clock.timeline()
    assert t["phases"] == {"imports": 0.0, "distributed_init": 0.0, "recipe_check": 2.0, "data_index": 6.0,
                           "model_build": 4.0, "engine_init": 0.0, "first_batch": 4.0, "first_step": 3.0}
    assert t["total_s"] == 19.0
    rec = startup_record([t, dict(t, total_s=25.0), t])
    assert rec["slowest_rank"] == 1 and rec["per_rank_total_s"] == [19.0, 25.0, 19.0]
    assert startup_line(rec).startswith("start-up 25.0 s (slowest: rank 1): imports 0.0 s, distributed_init 0.0 s")


def test_the_first_runs_clock_takes_what_lower_layers_timed_since_the_process_start(monkeypatch):
    """The output-dir wrapper starts the process group before setup makes the clock: its time is distributed_init,
    not imports."""
    now = [100.0]
    monkeypatch.setattr(phases.time, "time", lambda: now[0])
    monkeypatch.setattr(phases, "_FIRST_RUN", [True])
    monkeypatch.setattr(phases, "process_start", lambda: 90.0)
    monkeypatch.setattr(phases, "STARTUP", {"distributed_init": 4.0})  # rundir.owns_output_dir, before setup
    clock = StartupClock()
    now[0] += 1.0
    clock.mark("imports")
    clock.mark("distributed_init")
    assert clock.timeline()["phases"]["imports"] == 7.0 and clock.timeline()["phases"]["distributed_init"] == 4.0
