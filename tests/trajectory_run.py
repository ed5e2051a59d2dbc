"""Train the reference trajectory (tests/fixtures/mmpretrain/recipe/trajectory*.pth: 8 iterations of a small
perturbed MFF under mmpretrain's pretraining optimizer and schedule, 2 iterations per epoch, batch 4) through the
real pretraining path: a shipped-style recipe, `init_from` the fixture's mmpretrain checkpoint, `fit` with DeepSpeed
(ZeRO-2 or, --stage 1, ZeRO-1 without gradient hooks; fp32) on 1 or 2 CPU ranks, and `--micro` images per rank per micro-batch (4 / (micro x world) accumulation
steps). Only the data is the fixture's: each iteration's 4 normalised images and their masking noise, split over the
ranks and micro-batches in order. Writes OUT/metrics.jsonl and OUT/model_fp32.safetensors as any run does.

    python tests/trajectory_run.py OUT --micro 2
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trajectory_run.py OUT --micro 2
"""
import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from conftest import fixture  # noqa: E402

from mff_ds.engine.trainer import fit  # noqa: E402
from mff_ds.pretrain.recipe import from_dict  # noqa: E402
from mff_ds.pretrain.task import PretrainTask  # noqa: E402

BATCH = 4


def recipe_tree(micro: int, ckpt: str, reference: str = "mmengine", stage: int = 2) -> dict:
    """mff_vit-b_300e's optimizer and schedule (lr 2.4e-3 = base_lr x 4 / 256) on the fixture's model sizes."""
    return {
        "name": "trajectory", "seed": 0, "precision": "fp32", "init_from": ckpt,
        "model": {"arch": "mff_vit_tiny_patch16", "img_size": 64, "patch_size": 16, "embed_dim": 96, "depth": 4,
                  "num_heads": 3, "mlp_ratio": 4.0, "out_indices": [0, 1, 3], "decoder_embed_dim": 48,
                  "decoder_depth": 1, "decoder_num_heads": 3, "mask_ratio": 0.75, "norm_pix_loss": True,
                  "kernels": "torch"},
        "data": {"source": "synthetic", "num_samples": 8, "num_workers": 0},
        "batch": {"global_batch": BATCH, "micro_batch": micro},
        "optim": {"base_lr": 2.4e-3 * 256 / BATCH, "min_lr": 0.0, "betas": [0.9, 0.95], "eps": 1e-8,
                  "weight_decay": 0.05, "decay_fusion_logits": True, "grad_clip": 0.0},
        "schedule": {"reference": reference, "epochs": 300, "warmup_epochs": 40, "warmup_start_factor": 1e-4},
        "deepspeed": {"config": f"ds_configs/zero{stage}.json"},
        "checkpoint": {"every_steps": 0, "keep_last": 1, "export": True},
        "logging": {"every_steps": 1, "image_every_steps": 0, "tensorboard": False, "progress_bar": False},
    }


class FixtureLoader:
    """The fixture's iterations, `per_epoch` per epoch: this rank's share of each, in micro-batches of `micro`."""

    def __init__(self, inputs, noise, per_epoch: int, micro: int, rank: int, world: int):
        share = inputs.shape[1] // world  # inputs: (iterations, batch, 3, H, W)
        self.batches = []  # (images, noise) of every micro-batch of this rank, in order
        for x, n in zip(inputs, noise):
            x, n = x[rank * share:(rank + 1) * share], n[rank * share:(rank + 1) * share]
            self.batches += [(x[i:i + micro], n[i:i + micro]) for i in range(0, share, micro)]
        self.per_epoch = per_epoch * share // micro
        self.epoch = self.skip = 0

    def __len__(self):
        return self.per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self):
        start = self.epoch * self.per_epoch
        return iter(self.batches[start + self.skip:start + self.per_epoch])


class TrajectoryTask(PretrainTask):
    def __init__(self, recipe, traj):
        super().__init__(recipe)
        self.traj = traj

    def build(self, run):
        model, _ = super().build(run)  # the recipe's model with init_from loaded (the loader is replaced)
        t = self.traj
        return model, FixtureLoader(t["inputs"], t["noise"], t["meta"]["iterations_per_epoch"],
                                    self.recipe.batch.micro_batch, run.rank, run.world)

    def forward(self, engine, images, noise):
        return engine(images.to(self.device), noise=noise.to(self.device))


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("out")
    p.add_argument("--micro", type=int, default=BATCH)
    p.add_argument("--reference", default="mmengine", help="another schedule, to show the comparison can fail")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2), help="ZeRO stage (ds_configs/zeroN.json)")
    a = p.parse_args()
    traj = torch.load(fixture("recipe/trajectory.pth"), weights_only=True)
    world = int(os.environ.get("WORLD_SIZE", 1))
    recipe = from_dict(recipe_tree(a.micro, str(fixture("recipe/trajectory_ckpt.pth")), a.reference, a.stage), world)
    fit(TrajectoryTask(recipe, traj), a.out, max_steps=int(traj["meta"]["steps"]), resume="none")


if __name__ == "__main__":
    main()
