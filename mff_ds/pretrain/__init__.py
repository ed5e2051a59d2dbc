"""MFF / MAE pretraining: the recipe (`recipe.py`), the task on the engine's loop (`task.py`), the end-of-run
exports (`export.py`) and the command line (`cli.py`, `python -m mff_ds.pretrain`).

    from mff_ds.pretrain import load_recipe, train
    train(load_recipe("demo"), "runs/demo")

Names are imported on first use: `python -m mff_ds.pretrain` installs its signal handlers before torch loads.
"""
from mff_ds.common import lazy_exports

_WHERE = {"Recipe": "recipe", "load_recipe": "recipe", "PretrainTask": "task", "train": "task", "main": "cli"}
__all__ = list(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
