"""engine.compat.reconcile: what a resumed run may change, rule by rule, on markers built here (the runs written by an
earlier version are tests/test_upgrade.py's). Which keys the user set by hand comes from engine.recipe.read_tree."""
import copy

import pytest
import yaml

from mff_ds.engine import compat
from mff_ds.engine.recipe import check, leaf_keys, read_tree
from mff_ds.engine.schedule import LEGACY
from mff_ds.eval.recipe import load_eval_recipe
from mff_ds.pretrain.recipe import from_dict, load_recipe

EVAL_PATHS = ["data.train_path=/x/train", "data.val_path=/x/val"]


def marker(recipe, zero_stage=2, **over):
    """A completion marker of `recipe` as the trainer writes it."""
    return dict({"compat": copy.deepcopy(recipe.compat_dict()), "recipe": recipe.to_dict(), "name": recipe.name,
                 "zero_stage": zero_stage, "world_size": 1}, **over)


def demo(*sets):
    return load_recipe("demo", list(sets), world_size=1)


def test_the_same_recipe_resumes_with_nothing_to_say():
    r = demo("seed=5")
    out = compat.reconcile(marker(r), demo("seed=5"), 2)
    assert (out.incompatible, out.kept, out.changed, out.warning()) == ([], [], [], None)


def test_a_default_the_run_did_not_set_keeps_the_runs_value():
    then = demo("schedule.warmup_start_factor=0.5")  # what the shipped recipe said when the run started
    now = demo()
    out = compat.reconcile(marker(then), now, 2)
    assert out.incompatible == [] and out.changed == []
    assert out.kept == ["schedule.warmup_start_factor: the run's 0.5 (the recipe as started now says 0.0001; set it by "
                        "hand to change it)"]
    assert now.schedule.warmup_start_factor == 0.5 and out.warning() == f"kept: {out.kept[0]}"
    assert compat.reconcile(marker(then), now, 2).kept == []  # applied: nothing left to keep
    assert check(now, 1) == [] and now.schedule.warmup_start_factor == 0.5 and now.plan.global_batch == 32


def test_a_value_set_by_hand_is_refused_and_other_runs_are_never_continued():
    then = demo("schedule.warmup_start_factor=0.5")
    out = compat.reconcile(marker(then), demo("schedule.warmup_start_factor=0.25", "data.num_workers=3"), 2)
    assert out.incompatible == ["schedule.warmup_start_factor: checkpoint 0.5 -> recipe 0.25"] and out.kept == []
    assert out.changed == []  # refused: the compatible changes are not listed
    other = compat.reconcile(marker(then, name="mff_vit-b_300e"), demo(), 2)  # another recipe's run in this dir
    assert other.incompatible == ["schedule.warmup_start_factor: checkpoint 0.5 -> recipe 0.0001"]
    unnamed = marker(then, name=None)  # an older marker: the name in its recipe record
    unnamed["recipe"]["name"] = "mff_vit-b_300e"
    assert compat.reconcile(unnamed, demo(), 2).incompatible == other.incompatible
    unnamed["recipe"]["name"] = "demo"
    assert compat.reconcile(unnamed, demo(), 2).kept != []
    assert compat.reconcile(marker(then), from_dict(then.to_dict() | {"schedule": {}}, 1), 2).incompatible, \
        "a recipe built in code sets every key by hand"


def test_a_key_the_checkpoint_does_not_record_or_the_legacy_schedule_is_a_named_change():
    r = demo()
    m = marker(r)
    del m["compat"]["schedule"]["warmup_start_factor"]
    m["compat"]["schedule"]["reference"] = LEGACY
    m["compat"]["schedule"]["removed_since"] = 1  # a key this version no longer has: nothing to compare
    out = compat.reconcile(m, demo("schedule.reference=mae"), 2)  # by hand or not: nothing to keep
    assert out.incompatible == [] and out.kept == []
    assert out.changed[:2] == [
        f"schedule.reference: the checkpoint's: {LEGACY}; continuing with the recipe's 'mae'",
        "schedule.warmup_start_factor: not recorded by the version that wrote the checkpoint; continuing with the "
        "recipe's 0.0001"]


def test_settings_outside_the_binding_ones_are_compatible_changes():
    out = compat.reconcile(marker(demo()), demo("data.num_workers=3", "logging.every_steps=7"), 2)
    assert out.incompatible == [] and out.kept == []
    assert out.changed == ["data.num_workers: checkpoint 1 -> recipe 3", "logging.every_steps: checkpoint 10 -> recipe 7"]
    assert out.warning() == "changed: data.num_workers: checkpoint 1 -> recipe 3\n  changed: logging.every_steps: " \
                            "checkpoint 10 -> recipe 7"


def test_a_task_is_never_kept():
    lin = load_eval_recipe("configs/linprobe_demo.yaml", EVAL_PATHS, world_size=1)
    ft = load_eval_recipe("configs/finetune_demo.yaml", EVAL_PATHS + [f"name={lin.name}"], world_size=1)
    out = compat.reconcile(marker(lin), ft, 2)
    assert "task: checkpoint 'linprobe' -> recipe 'finetune'" in out.incompatible and ft.task == "finetune"


def test_a_kept_global_batch_is_what_the_next_plan_splits():
    then = demo("batch.global_batch=64")
    now = demo()
    out = compat.reconcile(marker(then), now, 2)
    assert out.kept == ["batch.global_batch: the run's 64 (the recipe as started now says 32; set it by hand to change "
                        "it)"]
    assert check(now, 2) == [] and (now.plan.global_batch, now.plan.micro, now.plan.accum) == (64, 16, 2)
    assert now.lr() == pytest.approx(1.2e-2 * 64 / 256)


def test_the_zero_stage_of_the_run_is_kept_unless_set_by_hand(tmp_path):
    then = demo("deepspeed.config=ds_configs/zero1.json")  # the demo ships ZeRO-2; say it shipped ZeRO-1 then
    now = demo()
    out = compat.reconcile(marker(then, zero_stage=1), now, 2)
    assert out.kept == ["deepspeed: the run's ZeRO stage 1 (this version's recipe uses stage 2: DeepSpeed cannot load "
                        "one stage's optimizer state into another; a fresh run gets it)"]
    assert (now.deepspeed.zero_stage, now.deepspeed.config) == (None, "ds_configs/zero1.json") and out.changed == []
    gone = marker(then, zero_stage=1)
    gone["recipe"]["deepspeed"]["config"] = str(tmp_path / "moved.json")  # the run's own file is not there now
    kept = demo()
    compat.reconcile(gone, kept, 2)
    assert (kept.deepspeed.zero_stage, kept.deepspeed.config) == (1, "ds_configs/zero2.json")
    pinned = demo()  # the run had set its stage by hand: its config and stage come back as they were
    compat.reconcile(marker(demo("deepspeed.zero_stage=1"), zero_stage=1), pinned, 2)
    assert (pinned.deepspeed.zero_stage, pinned.deepspeed.config) == (1, "ds_configs/zero2.json")
    for sets in (["deepspeed.zero_stage=2"], ["deepspeed.config=ds_configs/zero2.json"], ["deepspeed.overrides={}"]):
        hand = demo(*sets)
        assert compat.reconcile(marker(then, zero_stage=1), hand, 2).kept == [] and hand.deepspeed.zero_stage != 1
    universal = demo()
    assert compat.reconcile(marker(then, zero_stage=1, universal=True), universal, 2).kept == []
    assert compat.reconcile(marker(then, zero_stage=2), demo(), 2).kept == []


def test_a_marker_with_only_a_hash_is_equal_or_refused():
    r = demo()
    assert compat.reconcile({"recipe_hash": r.compat_hash()}, r, 2).incompatible == []
    assert compat.reconcile({}, r, 2).incompatible == []
    assert compat.reconcile({"recipe_hash": "0" * 16}, r, 2).incompatible == ["(recipe hash differs)"]


def test_what_counts_as_set_by_hand(tmp_path):
    r = demo("model.out_indices=[1, 5]", "optim.base_lr=0.01")
    assert r.by_hand("model.out_indices") and r.by_hand("model") and r.by_hand("optim.base_lr")
    assert not r.by_hand("model.embed_dim") and not r.by_hand("optim") is False
    assert not r.by_hand("optim.min_lr") and not r.by_hand("schedule.epochs")
    whole = demo("model={arch: mff_vit_tiny_patch16}")
    assert whole.by_hand("model.embed_dim")  # the section itself was set
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"name": "mine", "schedule": {"epochs": 3}, "model": {"depth": 2}}))
    tree, _, hand = read_tree(str(own), ["seed=4"])
    assert sorted(hand) == ["model.depth", "name", "schedule.epochs", "seed"] and tree["seed"] == 4
    _, _, shipped = read_tree("configs/demo.yaml", ["seed=4"])
    assert shipped == ["seed"] and read_tree("demo", [])[2] == [] and read_tree(None, ["a.b=1"])[2] == ["a.b"]
    assert leaf_keys({"a": {"b": 1, "c": {}}, "d": [1]}) == ["a.b", "a.c", "d"]


def test_differences_name_every_nested_key_once():
    old = {"a": {"b": 1, "c": 2}, "d": 3, "gone": 1}
    new = {"a": {"b": 1, "c": 4, "e": 5}, "d": {"x": 1}}
    assert compat.differences(old, new) == [("a.c", 2, 4), ("a.e", compat.ABSENT, 5), ("d", 3, {"x": 1}),
                                            ("gone", 1, compat.ABSENT)]
    assert compat.differences(old, new, only_new=True) == [("a.c", 2, 4), ("a.e", compat.ABSENT, 5),
                                                           ("d", 3, {"x": 1})]
    assert compat.differences({"a": {"b": 1, "gone": 2}}, {"a": {"b": 1}}, only_new=True) == []


def test_set_key_walks_sections_and_mappings_and_copies_the_value():
    section = type("Section", (), {})()
    recipe = type("Recipe", (), {"model": {"sub": {"k": 1}}, "optim": section})()
    value = [[1, 2]]
    compat.set_key(recipe, "model.sub.k", value)
    compat.set_key(recipe, "optim.betas", value)
    value[0].append(3)  # the marker's value changes later: the recipe's must not
    assert recipe.model["sub"]["k"] == [[1, 2]] and section.betas == [[1, 2]]


def test_the_data_order_of_a_run_in_flight_is_the_one_it_started_with():
    """Which samples each rank reads, in order, is part of what a run resumes with: the order mff-ds of 2026-12-06
    gave (tests/fixtures/upgrade/data_order.json) is the order now."""
    import json
    from pathlib import Path

    from mff_ds.data.sources import rank_indices
    saved = json.loads((Path(__file__).parent / "fixtures" / "upgrade" / "data_order.json").read_text())
    assert len(saved) == 30
    for case in saved:
        args = {k: v for k, v in case.items() if k != "indices"}
        assert rank_indices(**args).tolist() == case["indices"], args


def test_a_kept_value_this_start_cannot_honour_is_refused_not_trained_otherwise():
    """The run trained 33 images per step (32 do not split over 3 ranks; policy nearest). Resumed on 2 ranks, the
    kept 33 splits no better there and would become 32: refused, naming it. On 1 rank 33 splits (11 x 3): kept."""
    then = load_recipe("demo", ["batch.global_batch_policy=nearest"], world_size=3)
    assert then.plan.global_batch == 33
    kept = ["batch.global_batch: the run's 33 (the recipe as started now says 32; set it by hand to change it)"]
    for world, sets, refused in ((2, ["batch.global_batch_policy=nearest"], ["batch.global_batch: checkpoint 33 -> "
                                                                             "recipe 32"]), (1, [], [])):
        now = load_recipe("demo", sets, world_size=world)
        checks = []
        out = compat.resume_recipe(marker(then), now, 2, lambda: checks.append(check(now, world)) or 2)
        assert checks == [[]] and out.kept == kept and out.incompatible == refused
    assert now.plan.global_batch == 33 and (now.plan.micro, now.plan.accum) == (11, 3)
    same = load_recipe("demo", ["batch.global_batch_policy=nearest"], world_size=3)
    assert compat.resume_recipe(marker(then), same, 2, lambda: pytest.fail("nothing kept: no second check")).kept == []


def test_a_key_added_since_the_run_started_is_silent_at_its_default_and_named_when_set_by_hand():
    then = marker(demo())
    del then["recipe"]["distributed"]  # written before the section existed
    del then["recipe"]["data"]["index"]
    out = compat.reconcile(copy.deepcopy(then), demo(), 2)
    assert (out.incompatible, out.kept, out.changed) == ([], [], [])
    out = compat.reconcile(copy.deepcopy(then), demo("distributed.timeout_s=60"), 2)
    assert out.changed == ["distributed: checkpoint '<absent>' -> recipe {'timeout_s': 60.0, 'peer_timeout_s': 45.0}"]


FOLDER = ["data.source=imagefolder", "data.path=/x/train"]


@pytest.mark.parametrize("key", ["data.index", "data.train_index", "data.val_index"])
def test_a_dropped_index_keeps_the_runs_list_and_an_added_one_is_refused(key):
    """The data index keys bind a resume like the other data settings: a rerun that leaves out the list file the run
    trained on keeps it (said), one that adds a list file by hand is refused, never trained on another dataset."""
    def recipe(*sets):
        if key == "data.index":
            return demo(*FOLDER, *sets)
        return load_eval_recipe("configs/finetune_demo.yaml", EVAL_PATHS + ["data.source=imagefolder", *sets],
                                world_size=1)
    then = recipe(f"{key}=/x/meta/train.txt")
    now = recipe()
    out = compat.reconcile(marker(then), now, 2)
    assert out.incompatible == [] and out.kept == [f"{key}: the run's '/x/meta/train.txt' (the recipe as started now "
                                                   f"says None; set it by hand to change it)"]
    section, name = key.split(".")
    assert getattr(getattr(now, section), name) == "/x/meta/train.txt"
    out = compat.reconcile(marker(recipe()), recipe(f"{key}=/x/meta/train.txt"), 2)
    assert out.incompatible == [f"{key}: checkpoint None -> recipe '/x/meta/train.txt'"] and out.kept == []
    other = compat.reconcile(marker(then), recipe(f"{key}=/x/meta/other.txt"), 2)
    assert other.incompatible == [f"{key}: checkpoint '/x/meta/train.txt' -> recipe '/x/meta/other.txt'"]


@pytest.mark.parametrize("eval_run", [False, True])
def test_a_marker_from_before_format_4_trained_on_the_folder(eval_run):
    """Markers before format 4 left a None index out of their compat record: such a run trained on the folder's
    listing, so it resumes with nothing said, and a list file added on resume is refused (not "not recorded")."""
    from mff_ds.engine.checkpoint import migrate
    if eval_run:
        recipe = lambda *s: load_eval_recipe("configs/finetune_demo.yaml",  # noqa: E731
                                             EVAL_PATHS + ["data.source=imagefolder", *s], world_size=1)
        key = "data.train_index"
    else:
        recipe, key = (lambda *s: demo(*FOLDER, *s)), "data.index"  # noqa: E731
    old = marker(recipe(), format_version=3)
    for k in ("index", "train_index", "val_index", "allow_missing"):
        old["compat"]["data"].pop(k, None)
    out = compat.reconcile(migrate(copy.deepcopy(old), "x"), recipe(), 2)
    assert (out.incompatible, out.kept, out.changed) == ([], [], [])
    out = compat.reconcile(migrate(copy.deepcopy(old), "x"), recipe(f"{key}=/x/list.txt"), 2)
    assert out.incompatible == [f"{key}: checkpoint None -> recipe '/x/list.txt'"]
