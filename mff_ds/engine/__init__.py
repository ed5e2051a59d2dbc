"""Training engine on DeepSpeed: recipe, launcher environment, optimizer/schedule, loop, checkpoints, logging.

    from mff_ds.engine import load_recipe, train
    train(load_recipe("configs/demo.yaml"), "runs/demo")
"""
from .recipe import Recipe, RecipeError, load_recipe


def train(*args, **kwargs):
    """mff_ds.engine.trainer.train (imported lazily: it pulls in DeepSpeed)."""
    from .trainer import train as _train
    return _train(*args, **kwargs)


__all__ = ["Recipe", "RecipeError", "load_recipe", "train"]
