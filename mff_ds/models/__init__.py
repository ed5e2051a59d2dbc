"""Models: MaskedAutoencoder (MFF and plain MAE), named sizes, build_model()."""
from .archs import ModelConfig, ModelSection, ModelSpec, arch_names, config_problems, resolve_config
from .mae import MAEOutput, MaskedAutoencoder, build_model

__all__ = ["ModelConfig", "ModelSection", "ModelSpec", "config_problems", "MaskedAutoencoder", "MAEOutput", "build_model",
           "resolve_config", "arch_names"]
