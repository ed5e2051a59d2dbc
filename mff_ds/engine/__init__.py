"""The generic training engine on DeepSpeed: one loop for any task (`trainer.fit`), the shared recipe sections
(`recipe`), optimizer / schedule / DeepSpeed config (`optim`), checkpoints, metrics, signals, the run directory.
It depends on torch, DeepSpeed, `mff_ds.common`, `mff_ds.schema` and itself only (import contracts in
pyproject.toml); the pretraining task is `mff_ds.pretrain`, the classification tasks `mff_ds.eval`."""
