"""MFF / MAE pretraining on DeepSpeed: the task on the shared loop (`PretrainTask`, `train`) and the command line
of `python -m mff_ds.pretrain` and launch/pretrain.py.

  python -m mff_ds.pretrain                                  # the shipped demo recipe on this machine
  python -m mff_ds.pretrain --config mff_vit-b_300e          # a shipped recipe by name, or any YAML path
  torchrun --nproc_per_node 8 -m mff_ds.pretrain --config configs/mff_vit-b_300e.yaml
  deepspeed --hostfile hostfile launch/pretrain.py --config configs/mff_vit-b_300e.yaml
  srun launch/pretrain.py --config ...                       # rank/world/master from SLURM_*
"""
import os
import sys

from mff_ds.engine import signals

if __name__ == "__main__":
    signals.catch()  # before torch is imported: SIGUSR1/SIGTERM/SIGINT during start-up save at the first check


from mff_ds.engine import checkpoint as ckpt  # noqa: E402
from mff_ds.engine import logging as mlog  # noqa: E402
from mff_ds.engine.cli import load_or_report, run_or_report, run_parser, stopped  # noqa: E402
from mff_ds.engine.recipe import Recipe, check, load_recipe  # noqa: E402
from mff_ds.engine.trainer import Task, fit  # noqa: E402


class PretrainTask(Task):
    """MFF / MAE pretraining on the shared loop: uint8 batches normalised on the device, the model's own
    reconstruction loss, fusion weights and MFU in the metrics, reconstruction grids, exports at the end."""

    def check(self, world):
        return check(self.recipe, world)

    def build(self, run):
        from mff_ds.data import IMAGENET_MEAN, IMAGENET_STD, build_loader
        from mff_ds.models import build_model
        from mff_ds.models.flops import flops_per_image
        r = self.recipe
        model = build_model(r.model_config())
        loader = build_loader(r.data, img_size=model.cfg.img_size, micro_batch=r.batch.micro_batch, rank=run.rank,
                              world_size=run.world, seed=r.seed, epoch=0)
        self.cfg, self.device, self.dtype = model.cfg, run.device, run.dtype
        self.flops, self.peak = float(flops_per_image(model.cfg)), mlog.peak_tflops(run.device, r.logging.peak_tflops)
        self.mean, self.std = [v / 255 for v in IMAGENET_MEAN], [v / 255 for v in IMAGENET_STD]
        return model, loader

    def param_groups(self, model):
        o = self.recipe.optim
        return model.param_groups(o.weight_decay, decay_fusion_logits=o.decay_fusion_logits)

    def inputs(self, images):
        """uint8 batch -> normalised images on the device (kept for the reconstruction grid)."""
        from mff_ds.data import normalize
        self.x = normalize(images.to(self.device, non_blocking=True), dtype=self.dtype)
        return self.x

    def forward(self, engine, images, labels):
        return engine(self.inputs(images))

    def log_extras(self, run, out, metrics):
        m = {}
        if out.fusion_weights is not None:  # MFF: the softmax weights of the fused encoder layers
            m.update({f"fusion/w{i}": float(w) for i, w in enumerate(out.fusion_weights.detach().float().cpu())})
        if self.peak:
            m["mfu"] = self.flops * metrics["images_per_s"] / (self.peak * 1e12 * run.world)
        return m

    def after_step(self, run, out):
        every, step = self.recipe.logging.image_every_steps, run.pos.step
        if not (run.is_main and every and (step % every == 0 or step == run.stop_step)):
            return
        k = self.recipe.logging.num_images
        grid = mlog.reconstruction_grid(self.x[:k], out.pred[:k], out.mask[:k], self.cfg.patch_size, self.mean,
                                        self.std, self.cfg.norm_pix_loss)
        run.logger.image("reconstruction", grid, step)
        mlog.save_png(grid, os.path.join(run.output_dir, f"reconstruction_step{step:07d}.png"))
        mlog.save_png(grid, os.path.join(run.output_dir, "reconstruction.png"))

    def finish(self, run, stopped_by):
        """Exports (our model file, the timm encoder file and folder) of a run that reached its end."""
        if not (self.recipe.checkpoint.export and run.is_main and not stopped_by):
            return {"exported": []}
        return {"exported": ckpt.export(run.engine, run.ckpt_root, f"global_step{run.pos.step}", run.output_dir,
                                        {"step": run.pos.step, "recipe": self.recipe.name,
                                         "precision": run.precision})}


def train(recipe: Recipe, output_dir: str, max_steps=None, resume: str = "auto") -> dict:
    """Pretrain (or continue) `recipe` into output_dir; returns the loop's summary (+ exported files)."""
    return fit(PretrainTask(recipe), output_dir, max_steps=max_steps, resume=resume)


def main(argv=None, doc=__doc__) -> int:
    args = run_parser(doc, "demo", "batch.micro_batch=256").parse_args(argv)
    recipe = load_or_report(load_recipe, args, args.overrides)
    if recipe is None:
        return 2
    out = args.output_dir or os.path.join("runs", recipe.name)
    import torch.distributed as dist
    try:
        summary, code = run_or_report(lambda: train(recipe, out, max_steps=args.max_steps, resume=args.resume))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary is None:
        return code
    code = stopped(summary, out)
    if code is not None:
        return code
    if int(os.environ.get("RANK", "0")) == 0 and summary["first_loss"] is None:  # resumed at its last step
        print(f"nothing to do: the run in {out} is already at step {summary['step']}/{summary['total_steps']} "
              f"(--resume fresh starts it again, after moving these outputs aside)")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {summary['step']}/{summary['total_steps']}, loss {summary['first_loss']} -> "
              f"{summary['last_loss']}, outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
