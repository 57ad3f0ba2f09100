"""Configuration of the Stage-1 DiT: a frozen dataclass, saved as JSON beside the weights.

Field names follow the diffusers ``SanaWMTransformer3DModel`` config keys, so a diffusers ``config.json``
maps onto it directly (``TransformerConfig.from_diffusers``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CAMERA_MATHS = ("nvlabs", "diffusers")


@dataclass(frozen=True)
class TransformerConfig:
    in_channels: int = 128  # latent channels of the VAE (LTX-2: 128)
    num_layers: int = 20  # number of DiT blocks
    hidden_size: int = 2240  # residual width C
    num_attention_heads: int = 20  # heads of the text cross-attention
    linear_head_dim: int = 112  # head dim of the self-attention mixers (GDN and softmax); heads = C / this
    softmax_every_n: int = 4  # block i is softmax when (i + 1) % n == 0, else Gated DeltaNet; 0 = no softmax
    mlp_ratio: float = 3.0  # FFN inner width = C * mlp_ratio
    t_kernel_size: int = 3  # temporal conv kernel of the FFN (frames)
    conv_kernel_size: int = 4  # short causal conv on K in GDN blocks (frames)
    caption_channels: int = 2304  # text-encoder width (Gemma-2-2B: 2304)
    chunk_plucker_channels: int = 48  # 6 Plücker channels x 8 pixel frames per latent
    chunk_plucker_post_attn_blocks: int = 20  # blocks that add the Plücker embedding (-1 = all)
    rope_max_frames: int = 1024  # length of each RoPE axis table (latent frames / rows / columns)
    rope_theta: float = 10000.0
    gdn_eps: float = 1e-8  # added to the GDN normaliser before dividing
    camera_math: str = "nvlabs"  # "nvlabs" (the released weights) or "diffusers" (bit-level diffusers 0.42.1 port)
    softmax_bf16: bool = True  # cast softmax Q/K/V (and cached K/V) to bf16 before SDPA, as both references do
    first_chunk_frames: int = 4  # latent frames of chunk 0 in the chunk-causal and streaming modes
    chunk_frames: int = 3  # latent frames of every later chunk
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unused diffusers keys, kept for saving

    def __post_init__(self) -> None:
        if self.camera_math not in CAMERA_MATHS:
            raise ValueError(f"camera_math must be one of {CAMERA_MATHS}, got {self.camera_math!r}")
        if self.hidden_size % self.linear_head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of linear_head_dim {self.linear_head_dim}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads")
        if self.linear_head_dim % 8:
            raise ValueError("linear_head_dim must be a multiple of 8 (UCPE acts on 4x4 groups of its first half)")

    @property
    def heads(self) -> int:
        return self.hidden_size // self.linear_head_dim

    def is_softmax_block(self, index: int) -> bool:
        return self.softmax_every_n > 0 and (index + 1) % self.softmax_every_n == 0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **out}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **overrides: Any) -> "TransformerConfig":
        """Map a diffusers ``SanaWMTransformer3DModel`` config dict; options we do not implement raise."""
        config = dict(config)
        for key, wanted in _FIXED_DIFFUSERS_OPTIONS.items():
            if key in config and _normalise(config[key]) != _normalise(wanted):
                raise ValueError(f"unsupported transformer config: {key}={config[key]!r} (only {wanted!r} is implemented)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names}
        kwargs.update(overrides)
        return cls(**kwargs, extra=extra)


# Options of the diffusers class that the released checkpoints fix; anything else is a different model.
_FIXED_DIFFUSERS_OPTIONS: dict[str, Any] = {
    "patch_size": [1, 1, 1],
    "ffn_type": "GLUMBConvTemp",
    "k_conv_only": True,
    "pos_embed_type": "wan_rope",
    "qk_norm": True,
    "cross_norm": True,
    "y_norm": True,
    "cam_attn_compress": 1,
    "use_chunk_plucker_post_attn": True,
    "mlp_acts": ["silu", "silu", None],
    "use_pe": True,
    "pred_sigma": False,
    "learn_sigma": False,
}


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# The released 2.6 B configuration (SANA-WM_streaming, _chunk_causal and _bidirectional share it).
SANA_WM_CONFIG = TransformerConfig()

PRESETS: dict[str, TransformerConfig] = {
    "sana-wm-streaming": SANA_WM_CONFIG,
    "sana-wm-bidirectional": SANA_WM_CONFIG,
    # A small model of the same architecture for CPU runs and tests: 4 blocks (GDN, GDN, GDN, softmax).
    "tiny": TransformerConfig(
        in_channels=16,
        num_layers=4,
        hidden_size=96,
        num_attention_heads=2,
        linear_head_dim=48,
        mlp_ratio=2.0,
        caption_channels=24,
        chunk_plucker_post_attn_blocks=4,
    ),
    # The built-in demo, trained on procedural scenes (world_model/training): 6 blocks (5 GDN, 1 softmax),
    # ~9.8 M parameters, so the DiT and the "demo" VAE ship together in under 30 MB of bf16.
    "demo": TransformerConfig(
        in_channels=16,
        num_layers=6,
        hidden_size=256,
        num_attention_heads=2,
        linear_head_dim=128,
        softmax_every_n=6,
        mlp_ratio=2.0,
        caption_channels=24,
        chunk_plucker_post_attn_blocks=6,
    ),
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], **overrides)
