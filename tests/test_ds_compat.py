"""DeepSpeed internals are used only inside the tested version range; checkpoint markers carry a format version and
older ones are migrated in one place or refused with what to do."""
import re
import tomllib
from types import SimpleNamespace

import pytest

from conftest import REPO
from mff_ds.engine import checkpoint as ckpt
from mff_ds.engine import ds_compat


def test_pyproject_bounds_deepspeed_to_the_tested_range():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("deepspeed"))
    assert spec == f"deepspeed>={ds_compat.TESTED_RANGE[0]},<{ds_compat.TESTED_RANGE[1]}"
    assert ds_compat.in_tested_range(ds_compat.installed())  # what CI runs is what was read
    assert not ds_compat.in_tested_range("0.20.0") and not ds_compat.in_tested_range("0.19.7")
    assert ds_compat.in_tested_range("0.19.9+cu128")


def test_an_untested_deepspeed_switches_the_patches_off_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(ds_compat, "_state", {"checked": False, "on": True})
    monkeypatch.setattr(ds_compat, "installed", lambda: "0.21.0")
    refresh = object()
    opt = SimpleNamespace(_update_model_bit16_weights=refresh, bit16_groups_flat=[], bit16_groups=[])
    assert ds_compat.skip_view_refresh_while_intact(opt) is False
    assert opt._update_model_bit16_weights is refresh  # left as DeepSpeed ships it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DeepSpeed 0.21.0 is outside the range" in err[0] and ">=0.19.8,<0.20" in err[0]
    assert ds_compat.check_version() is False and capsys.readouterr().err == ""  # said once


def test_the_tested_deepspeed_applies_the_view_refresh_skip(monkeypatch):
    monkeypatch.setattr(ds_compat, "_state", {"checked": False, "on": True})
    calls = []
    flat = [__import__("torch").zeros(4)]
    opt = SimpleNamespace(_update_model_bit16_weights=calls.append, bit16_groups_flat=flat,
                          bit16_groups=[[flat[0][:2], flat[0][2:]]])
    assert ds_compat.skip_view_refresh_while_intact(opt) is True
    opt._update_model_bit16_weights(0)
    assert calls == []  # same buffers: skipped
    flat[0] = __import__("torch").zeros(4)  # DeepSpeed replaced the buffer (e.g. a checkpoint load)
    opt._update_model_bit16_weights(0)
    assert calls == [0]


def marker(**kw):
    return {"compat": {"seed": 0}, "recipe_hash": "x", "world_size": 1, **kw}


def test_markers_of_format_1_are_migrated_and_older_or_newer_refused():
    assert ckpt.migrate(marker(), "c")["parameter_alignment"] is False  # pretraining, before alignment
    assert ckpt.migrate(marker(task="finetune"), "c")["parameter_alignment"] is True
    assert ckpt.migrate(marker(parameter_alignment=True), "c") == marker(parameter_alignment=True,
                                                                          format_version=ckpt.FORMAT_VERSION)
    now = marker(format_version=ckpt.FORMAT_VERSION, parameter_alignment=False)
    assert ckpt.migrate(now, "c") == now
    with pytest.raises(ckpt.CheckpointError, match=re.escape("older than checkpoint format 1")) as e:
        ckpt.migrate({"recipe_hash": "x"}, "runs/a/checkpoints/global_step9")
    assert "--resume fresh" in str(e.value) and "runs/a/checkpoints/global_step9" in str(e.value)
    with pytest.raises(ckpt.CheckpointError, match="newer than this mff-ds reads"):
        ckpt.migrate(marker(format_version=ckpt.FORMAT_VERSION + 1), "c")
