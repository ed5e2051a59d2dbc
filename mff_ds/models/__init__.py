"""Models: MaskedAutoencoder (MFF and plain MAE), named sizes, build_model()."""
from .archs import ModelConfig, arch_names, build_model, resolve_config
from .mae import MAEOutput, MaskedAutoencoder

__all__ = ["ModelConfig", "MaskedAutoencoder", "MAEOutput", "build_model", "resolve_config", "arch_names"]
