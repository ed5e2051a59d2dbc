"""Training engine on DeepSpeed: recipe, launcher environment, optimizer/schedule, the one loop, checkpoints, logging.

    from mff_ds.engine import load_recipe
    from mff_ds.pretrain import train             # the pretraining task on the loop (engine.trainer.fit)
    train(load_recipe("demo"), "runs/demo")
"""
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
