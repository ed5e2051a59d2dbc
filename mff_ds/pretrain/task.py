"""MFF / MAE pretraining as a task on the shared loop (`PretrainTask`, `train`): uint8 batches normalised on the
device, the model's own reconstruction loss, fusion weights and MFU in the metrics, reconstruction grids, exports."""
import os
import sys

import torch

from mff_ds import convert, zoo
from mff_ds.common import atomic_write
from mff_ds.data import IMAGENET_MEAN, IMAGENET_STD, build_loader, normalize
from mff_ds.engine.trainer import Task, fit
from mff_ds.kernels.loss import patchify, unpatchify
from mff_ds.models import build_model
from mff_ds.models.flops import flops_per_image, peak_tflops

from .export import export
from .recipe import Recipe


class PretrainTask(Task):
    """MFF / MAE pretraining on the shared loop: uint8 batches normalised on the device, the model's own
    reconstruction loss, fusion weights and MFU in the metrics, reconstruction grids, exports at the end."""

    def build(self, run):
        r = self.recipe
        model = build_model(r.model_cfg())
        if r.init_from and not run.resumed:
            load_init(model, r.init_from)
        loader = build_loader(r.data, img_size=model.cfg.img_size, micro_batch=run.plan.micro, rank=run.rank,
                              world_size=run.world, seed=r.seed, epoch=0)
        self.cfg, self.device, self.dtype, self.source = model.cfg, run.device, run.dtype, loader.dataset.source
        self.flops, self.peak = float(flops_per_image(model.cfg)), peak_tflops(run.device, r.logging.peak_tflops)
        self.mean, self.std = [v / 255 for v in IMAGENET_MEAN], [v / 255 for v in IMAGENET_STD]
        return model, loader

    def data_identity(self):
        return self.source.identity()

    def param_groups(self, model):
        o = self.recipe.optim
        return model.param_groups(o.weight_decay, decay_fusion_logits=o.decay_fusion_logits)

    def inputs(self, images):
        """uint8 batch -> normalised images on the device (kept for the reconstruction grid)."""
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
        every, step = self.recipe.logging.image_every_steps, run.step
        if not (run.is_main and every and (step % every == 0 or step == run.stop_step)):
            return
        k = self.recipe.logging.num_images
        grid = reconstruction_grid(self.x[:k], out.pred[:k], out.mask[:k], self.cfg.patch_size, self.mean, self.std,
                                   self.cfg.norm_pix_loss)
        run.image("reconstruction", grid)
        save_png(grid, os.path.join(run.output_dir, f"reconstruction_step{step:07d}.png"))
        save_png(grid, os.path.join(run.output_dir, "reconstruction.png"))

    def finish(self, run, stopped_by):
        """Exports (our model file, the timm encoder file and folder) of a run that reached its end."""
        if not (self.recipe.checkpoint.export and run.is_main and not stopped_by):
            return {"exported": []}
        return {"exported": export(run.engine, run.ckpt_root, f"global_step{run.step}", run.output_dir,
                                   {"step": run.step, "recipe": self.recipe.name, "precision": run.precision})}


def load_init(model, source: str) -> None:
    """init_from: the weights of `source` (a file of any format convert reads, or a zoo name) into the freshly built
    model, every shape checked; an encoder-only file leaves the decoder as initialised."""
    sd = convert.model_state(zoo.resolve(source))
    encoder_only = not any(k.startswith("decoder_") for k in sd)
    if encoder_only:
        print(f"init_from {source}: encoder-only weights; the decoder starts as initialised", file=sys.stderr)
    convert.load_state_dict_checked(model, sd, f"init_from {source}", allow_missing_decoder=encoder_only)
    print(f"initialised from {source}", file=sys.stderr)


def train(recipe: Recipe, output_dir: str, max_steps=None, resume: str = "auto") -> dict:
    """Pretrain (or continue) `recipe` into output_dir; returns the loop's summary (+ exported files)."""
    return fit(PretrainTask(recipe), output_dir, max_steps=max_steps, resume=resume)


def reconstruction_grid(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                        mean, std, norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """(3, H', W') grid in [0,1]: one row per image with original | masked | reconstruction (visible patches
    pasted from the original). With norm-pix loss, pred is de-normalised with the target patch mean/var."""
    from torchvision.utils import make_grid
    images, pred, mask = images.float().cpu(), pred.detach().float().cpu(), mask.detach().float().cpu()
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    target = patchify(images, patch_size)
    if norm_pix:
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + eps).sqrt() + mu
    M = unpatchify(mask.unsqueeze(-1).expand_as(target).contiguous(), patch_size)  # 1 = masked pixel
    orig = (images * std + mean).clamp(0, 1)
    recon = (unpatchify(pred, patch_size) * std + mean).clamp(0, 1)
    rows = torch.stack([orig, orig * (1 - M) + 0.5 * M, recon * M + orig * (1 - M)], dim=1)
    return make_grid(rows.flatten(0, 1), nrow=3, padding=2, pad_value=1.0)


def save_png(img: torch.Tensor, path: str) -> None:
    from torchvision.utils import save_image
    atomic_write(path, lambda tmp: save_image(img, tmp, format="png"))
