"""mff-ds: MFF / MAE pretraining of Vision Transformers on DeepSpeed."""
__version__ = "0.1.0"
