"""SANA-WM world model: the Stage-1 DiT, its recurrent session state, sampler, VAE and engine."""

from .checkpoint import CheckpointError, inspect_checkpoint, load_transformer
from .config import PRESETS, TransformerConfig, preset

__all__ = ["CheckpointError", "PRESETS", "TransformerConfig", "inspect_checkpoint", "load_transformer", "preset"]
