"""Downstream evaluation: layer-decay groups, the linear probe's frozen encoder, evaluation of a classifier whose
accuracy is known analytically, and exact resume of a fine-tune (Mixup/CutMix, RandAugment, drop path)."""
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mff_ds import convert
from mff_ds.engine.schedule import LrSchedule
from mff_ds.eval import models as em
from mff_ds.eval.data import MEAN, STD
from mff_ds.eval.recipe import from_dict, load_eval_recipe

TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, out_indices=[0, 1])


def _imagefolder(root, n_classes=3, per_class=8, size=16, seed=0):
    """Coloured noise images; class k has a dominant colour channel, so it is learnable."""
    rng = np.random.default_rng(seed)
    for k in range(n_classes):
        os.makedirs(root / str(k), exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 120, (size, size, 3))
            a[..., k % 3] += 120
            Image.fromarray(a.astype(np.uint8)).save(root / str(k) / f"{i}.png")
    return str(root)


def _recipe(tmp_path, task, **over):
    train = _imagefolder(tmp_path / "train")
    val = _imagefolder(tmp_path / "val", per_class=4, seed=1)
    tree = {"name": task, "task": task, "seed": 3, "model": dict(TINY),
            "data": {"source": "imagefolder", "train_path": train, "val_path": val, "num_workers": 0},
            "augment": {"crop_scale": [0.5, 1.0], "val_crop_pct": 1.0},
            "batch": {"global_batch": 8, "micro_batch": 4}, "eval_batch": 16,
            "schedule": {"epochs": 2, "warmup_epochs": 1},
            "deepspeed": {"config": "ds_configs/zero0.json"},
            "checkpoint": {"every_epochs": 1, "keep_last": 3},
            "logging": {"every_steps": 1, "tensorboard": False, "progress_bar": False}}
    for k, v in over.items():
        tree[k] = {**tree[k], **v} if isinstance(v, dict) and isinstance(tree.get(k), dict) else v
    return from_dict(tree, world_size=1)


def _module_state(out_dir, step):
    sd = torch.load(os.path.join(out_dir, "checkpoints", f"global_step{step}", "mp_rank_00_model_states.pt"),
                    map_location="cpu", weights_only=False)
    return sd["module"]


# ------------------------------------------------------------------ recipes
def test_reference_recipes_load_with_the_reference_numbers():
    paths = ["data.train_path=/x/train", "data.val_path=/x/val"]
    ft = load_eval_recipe("configs/finetune_vit-b_100e.yaml", paths, world_size=8)
    assert math.isclose(ft.lr(), 2e-3) and ft.optim.layer_decay == 0.65 and ft.head.drop_path == 0.1
    assert (ft.augment.mixup, ft.augment.cutmix, ft.augment.smoothing, ft.augment.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert ft.augment.auto_augment == "rand-m9-mstd0.5-inc1" and ft.optim.betas == [0.9, 0.999]
    assert (ft.schedule.epochs, ft.schedule.warmup_epochs, ft.optim.min_lr, ft.optim.weight_decay) == (100, 5, 1e-6, 0.05)
    lp = load_eval_recipe("configs/linprobe_vit-b_90e.yaml", paths, world_size=8)
    assert lp.optim.name == "lars" and math.isclose(lp.lr(), 6.4) and lp.batch.global_batch == 16384
    assert (lp.schedule.epochs, lp.schedule.warmup_epochs, lp.optim.weight_decay) == (90, 10, 0.0)
    assert ft.schedule.reference == lp.schedule.reference == "mmengine"  # mmpretrain's configs
    for demo in ("configs/linprobe_demo.yaml", "configs/finetune_demo.yaml"):
        load_eval_recipe(demo, world_size=1)


@pytest.mark.parametrize("size,arch,drop_path", [("l", "mae_vit_large_patch16", 0.2), ("h", "mae_vit_huge_patch14", 0.3)])
def test_vit_l_h_recipes_have_the_official_mae_numbers(size, arch, drop_path):
    """facebookresearch/mae FINETUNE.md: fine-tune 50 epochs, blr 1e-3 at 1024, layer decay 0.75, drop path 0.2 (L)
    / 0.3 (H); linear probe: LARS, blr 0.1 at 16384, no weight decay, no trust ratio on the bias, bicubic resize."""
    paths = ["data.train_path=/x/train", "data.val_path=/x/val"]
    ft = load_eval_recipe(f"configs/finetune_vit-{size}_50e.yaml", paths, world_size=8)
    assert (ft.model["arch"], ft.head.drop_path, ft.optim.layer_decay, ft.batch.global_batch) == (arch, drop_path, 0.75, 1024)
    assert math.isclose(ft.lr(), 4e-3) and (ft.schedule.epochs, ft.schedule.warmup_epochs) == (50, 5)
    assert (ft.schedule.reference, ft.schedule.warmup_start_factor, ft.optim.min_lr) == ("mae", 0.0, 1e-6)
    assert (ft.augment.mixup, ft.augment.cutmix, ft.augment.smoothing, ft.augment.reprob) == (0.8, 1.0, 0.1, 0.25)
    lp = load_eval_recipe(f"configs/linprobe_vit-{size}_90e.yaml", paths, world_size=8)
    assert lp.model["arch"] == arch and lp.optim.name == "lars" and math.isclose(lp.lr(), 6.4)
    assert (lp.optim.weight_decay, lp.optim.lars_exclude_1d, lp.augment.val_interpolation) == (0.0, True, "bicubic")
    assert (lp.schedule.reference, lp.schedule.warmup_start_factor, lp.optim.min_lr) == ("mae", 0.0, 0.0)


def test_linprobe_val_resize_is_mmpretrains():
    """The ViT-B linear probe evaluates as mmpretrain's benchmark: ResizeEdge(256, short side, pillow, bilinear:
    the long side truncated), then the central 224 crop (offsets rounded), then normalised."""
    from mff_ds.eval.data import val_transform
    lp = load_eval_recipe("configs/linprobe_vit-b_90e.yaml", ["data.train_path=/x", "data.val_path=/y"], world_size=8)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (301, 397, 3), dtype=np.uint8))
    w, h = int(256 * 397 / 301), 256                                     # mmpretrain: int(scale * long / short)
    ref = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)
    top, left = int(round((h - 224) / 2)), int(round((w - 224) / 2))
    ref = (torch.from_numpy(ref[top:top + 224, left:left + 224]).permute(2, 0, 1) / 255 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    got = val_transform(224, lp.augment)(img)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    bicubic = dict(lp.augment.model_dump(), val_interpolation="bicubic")
    assert not torch.allclose(val_transform(224, type(lp.augment)(**bicubic))(img), ref, atol=1e-3)  # it can fail


def test_bad_recipe_lists_every_problem():
    from mff_ds.engine.recipe import RecipeError
    with pytest.raises(RecipeError) as e:
        from_dict({"task": "finetune", "model": dict(TINY), "data": {"source": "imagefolder"}, "head": {"drop_path": 1},
                   "augment": {"mixup": 0.8}, "batch": {"global_batch": 6, "micro_batch": 3}}, 2)
    assert e.value.problems == [  # Mixup / CutMix pair the images of a micro batch: at most 3 per rank leaves 2
        "batch.global_batch: 6 images cannot be split exactly over 2 rank(s) with at most 3 per micro batch (a "
        "multiple of 2); nearest: 4 (micro 2 x 1 accumulation, lr 7.813e-06) or 8 (micro 2 x 2 accumulation, lr "
        "1.563e-05); expected one of those, or batch.global_batch_policy: nearest to take the closest",
        "data.train_path: expected a directory or shard pattern for source 'imagefolder', got None",
        "data.val_path: expected a directory or shard pattern for source 'imagefolder', got None",
        "head.drop_path: expected < 1, got 1"], e.value.problems


def test_three_problems_of_different_kinds_are_all_reported():
    from mff_ds.engine.recipe import RecipeError
    with pytest.raises(RecipeError) as e:  # a wrong type, a batch no world of 8 can form, a negative epoch count
        load_eval_recipe("configs/finetune_demo.yaml", ["optim.weight_decay=lots", "batch.global_batch=100",
                                                        "schedule.epochs=-3"], world_size=8)
    assert e.value.problems == [
        "batch.global_batch: 100 images cannot be split exactly over 8 rank(s) with at most 64 per micro batch (a "
        "multiple of 2); nearest: 96 (micro 12 x 1 accumulation, lr 0.000375) or 112 (micro 14 x 1 accumulation, lr "
        "0.0004375); expected one of those, or batch.global_batch_policy: nearest to take the closest",
        "optim.weight_decay: expected float, got 'lots' (str)",
        "schedule.epochs: expected > 0, got -3"], e.value.problems


def test_loop_settings_are_shared_by_the_eval_recipe():
    """on_nonfinite / max_rollbacks / checkpoint.every_steps are the loop's, so fine-tuning takes them too."""
    from mff_ds.engine.recipe import RecipeError
    r = load_eval_recipe("configs/finetune_demo.yaml", ["on_nonfinite=rollback", "checkpoint.every_steps=5"],
                         world_size=1)
    assert (r.on_nonfinite, r.max_rollbacks, r.checkpoint.every_steps) == ("rollback", 3, 5)
    assert load_eval_recipe("configs/finetune_demo.yaml", world_size=1).checkpoint.every_steps == 0  # per epoch
    with pytest.raises(RecipeError) as e:
        load_eval_recipe("configs/finetune_demo.yaml", ["on_nonfinite=retry", "max_rollbacks=-1"], world_size=1)
    assert [p.split(":")[0] for p in e.value.problems] == ["on_nonfinite", "max_rollbacks"], e.value.problems


# ------------------------------------------------------------------ layer decay
def test_layer_decay_groups_reproduce_the_reference_scales_for_vit_b():
    vit_b = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
    model = em._vit(vit_b, num_classes=1000, global_pool="avg")
    groups = em.finetune_param_groups(model, 0.05, 0.65)
    name = {id(p): n for n, p in model.named_parameters()}
    scale = {name[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay = {name[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert set(scale) == set(name.values())  # every parameter trains, exactly once
    # the measured reference values (docs 3.2)
    assert math.isclose(scale["patch_embed.proj.weight"], 0.003697, abs_tol=5e-7)
    assert math.isclose(scale["blocks.0.attn.qkv.weight"], 0.005688, abs_tol=5e-7)
    assert scale["blocks.11.mlp.fc2.bias"] == pytest.approx(0.65)
    for n in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
        assert scale[n] == pytest.approx(1.0)
    for n, s in scale.items():  # the rule: depth 0 = embeddings, block i = i + 1, the rest 13
        m = re.match(r"blocks\.(\d+)\.", n)
        depth = int(m.group(1)) + 1 if m else (0 if n.startswith(("cls_token", "pos_embed", "patch_embed")) else 13)
        assert s == pytest.approx(0.65 ** (13 - depth)), n
        no_decay = n.endswith(".bias") or "norm" in n or n in ("cls_token", "pos_embed")
        assert decay[n] == (0.0 if no_decay else 0.05), n
    opt = torch.optim.AdamW(groups, lr=1.0)
    LrSchedule("mmengine", 2e-3, 0.0, 1e-4, 100, 5, 10, 10).apply(opt, 50)  # the engine's schedule honours lr_scale
    assert sorted({round(g["lr"] / 2e-3, 6) for g in opt.param_groups}) == sorted({round(0.65 ** k, 6) for k in range(14)})


def test_finetune_model_drops_final_norm_and_pools_patch_tokens():
    torch.manual_seed(0)
    mae = convert.build_model(TINY)
    for p in mae.norm.parameters():
        torch.nn.init.normal_(p)
    model = em.build_finetune_model(convert.to_timm(mae), mae.cfg, num_classes=5, drop_path=0.1).eval()
    assert model.global_pool == "avg" and isinstance(model.norm, torch.nn.Identity)
    assert torch.equal(model.fc_norm.weight, torch.ones(32)) and torch.equal(model.fc_norm.bias, torch.zeros(32))
    assert model.head.weight.std() < 1e-4 and model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # forward_features without the final norm = our blocks' output
        ref = mae.forward_features(x)
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    blocks_out = torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (32,), eps=1e-6)
    assert torch.allclose(pooled, blocks_out, atol=1e-5)
    assert torch.allclose(mae.norm(tokens), ref, atol=1e-5)


# ------------------------------------------------------------------ linear probe
def test_linear_probe_trains_only_the_head_and_batchnorm_statistics(tmp_path):
    from mff_ds.eval.train import _lars_groups, run
    torch.manual_seed(1)
    mae = convert.build_model(TINY)
    ckpt_path = tmp_path / "pretrained.safetensors"
    convert.save_model(mae, ckpt_path)
    r = _recipe(tmp_path, "linprobe", init={"checkpoint": str(ckpt_path), "format": "auto"},
                optim={"name": "lars", "base_lr": 12.8, "weight_decay": 0.0})
    probe = em.build_linprobe_model(convert.to_timm(mae), mae.cfg, 3)
    assert [g["name"] for g in _lars_groups(probe, r)] == ["head.weight", "head.bias"]
    assert not probe.bn.affine and probe.bn.eps == 1e-6 and probe.head.weight.std().item() == pytest.approx(0.01, rel=0.3)
    s = run(r, str(tmp_path / "out"), quiet=True)
    assert s["step"] == 6 and len(s["history"]) == 2
    mid, final = _module_state(str(tmp_path / "out"), 3), _module_state(str(tmp_path / "out"), 6)
    for k, v in convert.to_timm(mae).items():  # encoder, incl. the pretrained final norm: bit-identical
        assert torch.equal(mid["encoder." + k], v) and torch.equal(final["encoder." + k], v), k
    assert not torch.allclose(final["head.weight"], mid["head.weight"])  # the head learns
    assert not torch.allclose(final["head.bias"], mid["head.bias"])
    assert final["bn.num_batches_tracked"].item() == 12  # 6 steps x 2 micro-batches
    assert final["bn.running_mean"].abs().sum() > 0 and not torch.allclose(final["bn.running_var"], torch.ones(32))
    # the best classifier file reloads and scores what the run reported
    from mff_ds.eval.train import evaluate_checkpoint
    res = evaluate_checkpoint(s["best_path"], str(tmp_path / "val"), crop_pct=1.0, num_workers=0)
    assert res["top1"] == pytest.approx(s["best_top1"]) and res["val_samples"] == 12


# ------------------------------------------------------------------ evaluation of a known checkpoint
def _known_classifier():
    """A fine-tune-layout ViT whose logits are, up to LayerNorm's positive scaling, [mean normalised R, G, B,
    0.5, 0.4, 0.3, 0.2, 0.1]: blocks are identities (zero residual branches), positions zero, the patch
    embedding averages one colour channel per output channel, head = identity."""
    vit = dict(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, mlp_ratio=4.0)
    model = em._vit(vit, num_classes=8, global_pool="avg")
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for c in range(3):
        sd["patch_embed.proj.weight"][c, c] = 1.0 / 64
    sd["patch_embed.proj.bias"][3:] = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1])
    for k in ("blocks.0.norm1.weight", "blocks.0.norm2.weight", "fc_norm.weight"):
        sd[k] = torch.ones(8)
    sd["head.weight"] = torch.eye(8)
    return vit, sd


def test_evaluation_of_a_known_checkpoint_gives_the_known_accuracy(tmp_path, capsys):
    from mff_ds.eval.cli import evaluate_main
    from mff_ds.eval.train import evaluate_checkpoint
    rng = np.random.default_rng(0)
    n, hits1, hits5 = 30, 0, 0
    for i in range(n):  # solid colours: the class ranking is known in closed form
        rgb = rng.integers(0, 256, 3)
        score = np.concatenate([(rgb / 255 - np.array(MEAN)) / np.array(STD), [0.5, 0.4, 0.3, 0.2, 0.1]])
        order = np.argsort(-score)
        label = int(order[[0, 3, 7][i % 3]])  # top-1 hit / top-5 only / miss
        hits1 += i % 3 == 0
        hits5 += i % 3 != 2
        d = tmp_path / "val" / str(label)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.broadcast_to(rgb.astype(np.uint8), (20, 20, 3)).copy()).save(d / f"{i}.png")
    for c in range(8):  # ImageFolder needs every class folder
        (tmp_path / "val" / str(c)).mkdir(exist_ok=True)
        if not os.listdir(tmp_path / "val" / str(c)):
            Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "val" / str(c) / "black.png")
    black = np.argsort(-np.concatenate([(0 - np.array(MEAN)) / np.array(STD), [0.5, 0.4, 0.3, 0.2, 0.1]]))
    extra = [c for c in range(8) if os.path.exists(tmp_path / "val" / str(c) / "black.png")]
    n += len(extra)
    hits1 += sum(c == black[0] for c in extra)
    hits5 += sum(c in black[:5] for c in extra)
    want1, want5 = 100 * hits1 / n, 100 * hits5 / n
    assert 20 < want1 < want5 < 90  # a non-trivial target

    vit, sd = _known_classifier()
    ours = tmp_path / "ours.safetensors"
    em.save_classifier(sd, ours, "finetune", vit, 8)
    res = evaluate_checkpoint(str(ours), str(tmp_path / "val"), crop_pct=0.8, num_workers=0, batch=7)
    assert res["val_samples"] == n
    assert res["top1"] == pytest.approx(want1) and res["top5"] == pytest.approx(want5)
    # the same set as WebDataset shards (png + cls), two shards
    import webdataset as wds
    files = sorted((tmp_path / "val").glob("*/*.png"))
    for j in range(2):
        with wds.TarWriter(str(tmp_path / f"val-{j}.tar")) as w:
            for i, f in enumerate(files[j::2]):
                w.write({"__key__": f"{j}_{i:04d}", "png": f.read_bytes(), "cls": f.parent.name.encode()})
    res = evaluate_checkpoint(str(ours), str(tmp_path / "val-{0..1}.tar"), crop_pct=0.8, num_workers=2, batch=7)
    assert res["val_samples"] == n and res["top1"] == pytest.approx(want1) and res["top5"] == pytest.approx(want5)
    # the same weights in the official MAE and mmpretrain fine-tuned layouts
    torch.save({"model": sd}, tmp_path / "mae_finetuned.pth")
    mm = convert.to_mmpretrain({k: v for k, v in sd.items() if not k.startswith(("fc_norm", "head"))})
    mm.update({"backbone.ln2.weight": sd["fc_norm.weight"], "backbone.ln2.bias": sd["fc_norm.bias"],
               "head.fc.weight": sd["head.weight"], "head.fc.bias": sd["head.bias"]})
    torch.save({"meta": {}, "state_dict": mm}, tmp_path / "mm_finetuned.pth")
    rc = evaluate_main([str(ours), str(tmp_path / "mae_finetuned.pth"), str(tmp_path / "mm_finetuned.pth"),
                        "--val", str(tmp_path / "val"), "--crop-pct", "0.8", "--num-workers", "0",
                        "--num-heads", "2", "--output-dir", str(tmp_path / "evalout")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count(f"{want1:.2f}") == 3 and printed.count(f"{want5:.2f}") == 3, printed
    lines = [json.loads(line) for line in open(tmp_path / "evalout" / "metrics.jsonl")]
    assert [round(r["top1"], 6) for r in lines] == [round(want1, 6)] * 3


# ------------------------------------------------------------------ resume
def test_finetune_resumes_exactly_mid_epoch(tmp_path):
    from mff_ds.eval.train import run
    r = _recipe(tmp_path, "finetune",
                augment={"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0,
                         "smoothing": 0.1},
                head={"drop_path": 0.1}, optim={"name": "adamw", "base_lr": 1e-3, "layer_decay": 0.65},
                deepspeed={"config": "ds_configs/zero2.json"})
    full = run(r, str(tmp_path / "full"), quiet=True)
    part = run(r, str(tmp_path / "split"), max_steps=4, quiet=True)  # stops inside epoch 1 (3 steps / epoch)
    assert part["step"] == 4 and len(part["history"]) == 1
    resumed = run(r, str(tmp_path / "split"), quiet=True)
    assert resumed["step"] == full["step"] == 6
    a, b = _module_state(str(tmp_path / "full"), 6), _module_state(str(tmp_path / "split"), 6)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())
    assert [h["top1"] for h in resumed["history"]] == [h["top1"] for h in full["history"]]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl") if "images_per_s" in line]
    assert steps == [1, 2, 3, 4, 5, 6]
    # a different recipe refuses the checkpoint
    from mff_ds.engine.trainer import IncompatibleCheckpointError
    r2 = _recipe(tmp_path, "finetune", optim={"name": "adamw", "base_lr": 2e-3})
    with pytest.raises(IncompatibleCheckpointError):
        run(r2, str(tmp_path / "split"), quiet=True)


def test_randaugment_survives_zero_bit_posterize():
    """rand-m9-mstd0.5-inc1 reaches magnitude 10 = posterize to 0 bits, which Pillow >= 13 rejects."""
    from timm.data import auto_augment as aa

    from mff_ds.eval.data import train_transform
    from mff_ds.eval.recipe import AugConfig
    t = train_transform("finetune", 16, AugConfig(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25))
    img = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    assert aa.NAME_TO_OP["PosterizeIncreasing"](img, 0).getextrema() == ((0, 0),) * 3
    assert t(img).shape == (3, 16, 16)


def test_the_checkpoints_encoder_trains_and_every_key_the_recipe_says_otherwise_is_named(tmp_path, capsys):
    """A recipe whose model section says 48-d x 3 blocks x 4 heads fine-tunes a 32-d x 2-block x 2-head checkpoint:
    one line per differing key, the checkpoint's encoder trains, recipe.yaml records it, and the same recipe
    resumes the run (the resume compares what trains, not what the recipe said)."""
    import yaml

    from mff_ds.eval.train import run
    torch.manual_seed(2)
    mae = convert.build_model(TINY)
    ckpt_path = tmp_path / "pretrained.safetensors"
    convert.save_model(mae, ckpt_path)
    r = _recipe(tmp_path, "finetune", init={"checkpoint": str(ckpt_path)},
                model=dict(TINY, embed_dim=48, depth=3, num_heads=4), optim={"name": "adamw", "layer_decay": 0.65})
    s = run(r, str(tmp_path / "out"), max_steps=2, quiet=True)
    err = capsys.readouterr().err
    assert "model.embed_dim: the recipe says 48, the checkpoint has 32; training the checkpoint's" in err
    assert "model.depth: the recipe says 3, the checkpoint has 2" in err and "model.patch_size" not in err
    assert "model.num_heads: the recipe says 4, the checkpoint has 2" in err  # the resume must not hold it against it
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["model"]
    assert (saved["embed_dim"], saved["depth"]) == (32, 2)
    state = _module_state(str(tmp_path / "out"), 2)
    assert state["blocks.0.attn.qkv.weight"].shape == (96, 32) and "blocks.2.norm1.weight" not in state
    again = _recipe(tmp_path, "finetune", init={"checkpoint": str(ckpt_path)},
                    model=dict(TINY, embed_dim=48, depth=3, num_heads=4), optim={"name": "adamw", "layer_decay": 0.65})
    assert run(again, str(tmp_path / "out"), max_steps=3, quiet=True)["step"] == 3 == s["step"] + 1
    # the same command without --checkpoint (a recipe that names no init.checkpoint, its model keys as written):
    # the run keeps its init.checkpoint, whose encoder the recipe's model gives way to, and resumes
    from mff_ds.engine.recipe import leaf_keys
    dropped = _recipe(tmp_path, "finetune", model=dict(TINY, embed_dim=48, depth=3, num_heads=4),
                      optim={"name": "adamw", "layer_decay": 0.65})
    dropped._by_hand = frozenset(k for k in leaf_keys(dropped.to_dict()) if not k.startswith("init."))
    capsys.readouterr()
    assert run(dropped, str(tmp_path / "out"), max_steps=4, quiet=True)["step"] == 4
    assert f"kept: init.checkpoint: the run's {str(ckpt_path)!r}" in capsys.readouterr().err
    assert dropped.init.checkpoint == str(ckpt_path) and _module_state(str(tmp_path / "out"), 4)[
        "blocks.0.attn.qkv.weight"].shape == (96, 32)


def test_labels_outside_the_classes_are_refused_before_a_step(tmp_path):
    """A list file whose labels do not fit the classes (label 5 of 3 classes; an unlabelled line) stops the start in
    one line naming the file, before any step: not a traceback (CPU) or a device-side assert (CUDA) mid-run."""
    from mff_ds.common import UserError
    from mff_ds.eval.train import run
    r = _recipe(tmp_path, "finetune", optim={"name": "adamw"})
    names = sorted(p.relative_to(r.data.train_path).as_posix() for p in Path(r.data.train_path).rglob("*.png"))
    for label, said in ((5, "got 5 for '1/"), (-1, "got -1 (unlabelled) for '1/")):
        lst = tmp_path / f"train{label}.txt"
        lst.write_text("".join(f"{n} {label if n.startswith('1/') else 0}\n" for n in names))
        bad = _recipe(tmp_path, "finetune", optim={"name": "adamw"},
                      data={"train_index": str(lst), "num_classes": 3})
        with pytest.raises(UserError) as e:
            run(bad, str(tmp_path / f"out{label}"), max_steps=1, quiet=True)
        assert str(e.value).startswith(f"data.train_index: expected labels in [0, 3) (data.num_classes: 3), {said}")
        assert "and 7 more" in str(e.value) and not (tmp_path / f"out{label}" / "metrics.jsonl").exists()
