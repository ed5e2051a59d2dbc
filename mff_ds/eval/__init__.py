"""Downstream evaluation: fine-tuning, linear probing and top-1/top-5 evaluation of pretrained encoders.

recipe.py  EvalRecipe (YAML + --set overrides, validated)     models.py  timm ViT classifiers, checkpoint loading
data.py    ImageFolder / WebDataset + timm transforms          train.py   the loop on the DeepSpeed engine
metrics.py top-k accuracy and the results table               probes.py  k-NN / logistic regression on frozen features
stats.py   mean, Student-t interval and paired difference over seeds

Names are imported on first use: `mff-ds finetune --help` answers without loading torch.
"""
from mff_ds.common import lazy_exports

_WHERE = {"EvalRecipe": "recipe", "load_eval_recipe": "recipe"}
__all__ = list(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
