"""engine/goodput.py: the breakdown of a run's wall time over its attempts, on records written by hand (the trainer's
own records are checked end to end in tests/test_engine_resume.py's kill-and-resume test)."""
from hypothesis import given, settings
from hypothesis import strategies as st

from mff_ds.engine import goodput


def attempt(start, resumed_at, startup, train, ckpt, last, seen, ended=None, ended_at=None):
    return {"start": start, "resumed_at": resumed_at, "startup_s": startup, "train_s": train, "checkpoint_s": ckpt,
            "first": resumed_at, "last": last, "seen": seen, "ended": ended, "ended_at": ended_at}


def test_a_killed_attempt_costs_its_redone_steps_and_the_gap_to_the_restart():
    # attempt 1: steps 0-100 in 100 s (from t=10 to 110), killed after its last sign at t=110; the restart begins
    # at t=150 from the checkpoint of step 80: steps 81-100 (20 s) are redone; attempt 2 runs 80-200 and ends
    runs = [attempt(0, 0, 10, 100, 2, 100, 110), attempt(150, 80, 12, 120, 3, 200, 290, "done", 290)]
    b = goodput.breakdown(runs)
    assert b["wall_s"] == 290 and b["redone_steps"] == 20 and b["redone_s"] == 20
    assert b["steps_s"] == 80 + 120 and b["failure_gap_s"] == 40 and b["failure_s"] == 60
    assert b["startup_s"] == 22 and b["checkpoint_s"] == 5 and b["other_s"] == 290 - 200 - 22 - 5 - 60
    assert b["goodput"] == 200 / 290
    assert goodput.line(b) == ("goodput 69.0% of 4m50s, 2 attempts: steps 3m20s, start-up 22s, checkpoints 5.0s, "
                               "failures 1m00s (detection and restart 40s, 20 redone step(s) 20s), other 3.0s")


def test_a_stop_is_not_a_failure():
    runs = [attempt(0, 0, 5, 50, 1, 50, 60, "stopped", 61), attempt(100, 50, 5, 50, 1, 100, 160, "done", 160)]
    b = goodput.breakdown(runs)
    assert b["stop_gap_s"] == 39 and b["failure_s"] == 0 and b["redone_steps"] == 0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.floats(0, 100), st.integers(0, 50), st.floats(0, 20), st.floats(0, 200),
                          st.floats(0, 10), st.integers(0, 100), st.floats(0, 50),
                          st.sampled_from([None, "done", "stopped", "lost peer", "error"])), min_size=1, max_size=5))
def test_the_categories_add_up_to_the_wall_time(parts):
    """Whatever the records, the categories are never negative and add up to the wall time whenever the records
    are consistent (each attempt's recorded time fits before the next one starts)."""
    runs, t, step = [], 0.0, 0
    for gap, back, startup, train, ckpt, steps, idle, ended in parts:
        start, resumed = t + gap, max(step - back, 0)
        seen = start + startup + train + ckpt + idle
        runs.append(attempt(start, resumed, startup, train, ckpt, resumed + steps, seen, ended,
                            seen if ended else None))
        t, step = seen, resumed + steps
    b = goodput.breakdown(runs)
    parts_sum = sum(b[k] for k in ("steps_s", "startup_s", "checkpoint_s", "failure_s", "stop_gap_s", "other_s"))
    assert min(b[k] for k in ("steps_s", "failure_s", "other_s", "stop_gap_s")) >= 0
    assert abs(parts_sum - b["wall_s"]) <= 1e-6 * max(b["wall_s"], 1)
    assert 0 <= b["goodput"] <= 1
