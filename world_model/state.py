"""Per-session recurrent state of the streaming Stage-1 DiT (sana-wm.md B.5, as corrected by section L).

Constant in session length. For a batch of B sessions and S tokens per latent frame:

* every GDN block (``GDNCarry``): ``main`` (B, H, D, D) fp32 numerator state in [K, V] layout; ``norm``
  (B, H, D, 1) fp32 normaliser state; ``camera`` (B, H, D, D) fp32 camera state; ``k_tail``
  (B, 3, S, C) the last 3 raw K frames before the short conv (model dtype);
* every softmax block (``SoftmaxCarry``): post-RoPE main K/V and post-UCPE camera K/V of the sink chunk 0
  and of the previous chunk (None while the previous chunk is the sink), (B, H, n, D) bf16;
* every block: ``ffn_tail`` (B, 1, S, C), the last frame before the FFN's temporal conv;
* ``next_frame``: the absolute latent index of the next chunk's first frame (a tuple, one per session, when
  sessions at different points are batched).

Serialisation (``to_bytes``/``from_bytes``, ``save``/``load``) is safetensors plus a JSON header, so a
session can be suspended, moved and resumed bit-exactly.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .transformer import BlockCarry, GDNCarry, SoftmaxCarry, WindowKV

_WINDOW_FIELDS = ("k", "v", "k_cam", "v_cam")


class SessionState:
    """Everything the DiT needs to continue a batch of sessions; advanced in place by ``write_state=True``."""

    def __init__(self, carries: list[BlockCarry], next_frame: int | tuple[int, ...] = 0) -> None:
        self.carries = carries
        self.next_frame = next_frame

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``name -> tensor`` view, e.g. ``blocks.0.main``, ``blocks.3.sink.k``."""
        out: dict[str, torch.Tensor] = {}
        for i, carry in enumerate(self.carries):
            prefix = f"blocks.{i}."
            if carry.ffn_tail is not None:
                out[prefix + "ffn_tail"] = carry.ffn_tail
            mixer = carry.mixer
            if isinstance(mixer, GDNCarry):
                for f in fields(mixer):
                    value = getattr(mixer, f.name)
                    if value is not None:
                        out[prefix + f.name] = value
            else:
                for slot in ("sink", "prev"):
                    window = getattr(mixer, slot)
                    if window is not None:
                        for name in _WINDOW_FIELDS:
                            out[f"{prefix}{slot}.{name}"] = getattr(window, name)
        return out

    def kinds(self) -> list[str]:
        return ["softmax" if isinstance(c.mixer, SoftmaxCarry) else "gdn" for c in self.carries]

    def to_bytes(self) -> bytes:
        meta = {"next_frame": json.dumps(self.next_frame), "kinds": json.dumps(self.kinds())}
        return st_save({k: v.contiguous().cpu() for k, v in self.tensors().items()}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, device: str | torch.device = "cpu") -> "SessionState":
        meta = safetensors_metadata(data)
        tensors = {k: v.to(device) for k, v in st_load(data).items()}
        frame = json.loads(meta["next_frame"])
        return cls.from_tensors(tensors, json.loads(meta["kinds"]), tuple(frame) if isinstance(frame, list) else frame)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kinds: list[str], next_frame: int | tuple[int, ...]) -> "SessionState":
        """Inverse of ``tensors()``."""
        carries = []
        for i, kind in enumerate(kinds):
            get = lambda name: tensors.get(f"blocks.{i}.{name}")
            if kind == "gdn":
                mixer = GDNCarry(**{f.name: get(f.name) for f in fields(GDNCarry)})
            else:
                windows = {}
                for slot in ("sink", "prev"):
                    parts = [get(f"{slot}.{n}") for n in _WINDOW_FIELDS]
                    windows[slot] = WindowKV(*parts) if parts[0] is not None else None
                mixer = SoftmaxCarry(**windows)
            carries.append(BlockCarry(mixer=mixer, ffn_tail=get("ffn_tail")))
        return cls(carries, next_frame=next_frame)

    @classmethod
    def stack(cls, states: list["SessionState"]) -> "SessionState":
        """One batched state (batch = the sessions in order). Sessions may sit at different latent frames
        (each keeps its own RoPE positions) but must hold the same slots: a session in its first chunk
        (empty state) or second (no previous chunk in its window yet) only batches with its own kind."""
        parts = [s.tensors() for s in states]
        if any(p.keys() != parts[0].keys() for p in parts):
            raise ValueError("sessions hold different state slots (they are at different chunk kinds: first, second, later)")
        tensors = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
        frames = tuple(f for s in states for f in s.frames())
        return cls.from_tensors(tensors, states[0].kinds(), frames[0] if len(set(frames)) == 1 else frames)

    def frames(self) -> tuple[int, ...]:
        """``next_frame`` of each session in the batch."""
        if isinstance(self.next_frame, tuple):
            return self.next_frame
        tensors = self.tensors()
        return (self.next_frame,) * (next(iter(tensors.values())).shape[0] if tensors else 1)

    def split(self) -> list["SessionState"]:
        """The per-session states of a batched state (views; ``clone`` them to keep them apart)."""
        tensors = self.tensors()
        return [
            SessionState.from_tensors({k: v[i : i + 1] for k, v in tensors.items()}, self.kinds(), frame)
            for i, frame in enumerate(self.frames())
        ]

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SessionState":
        return cls.from_bytes(Path(path).read_bytes(), device)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors byte string's JSON header."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {})


def state_layout(config, latent_hw: tuple[int, int], dtype: torch.dtype = torch.bfloat16, batch: int = 1) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of a session state once the softmax window is full (after two chunks).

    Derived from the config alone, so the full model's state size is known without building it.
    """
    s = latent_hw[0] * latent_hw[1]
    c, h, d = config.hidden_size, config.heads, config.linear_head_dim
    kv_dtype = torch.bfloat16 if config.softmax_bf16 else dtype
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for i in range(config.num_layers):
        p = f"blocks.{i}."
        out[p + "ffn_tail"] = ((batch, config.t_kernel_size // 2, s, c), dtype)
        if config.is_softmax_block(i):
            for slot, frames in (("sink", config.first_chunk_frames), ("prev", config.chunk_frames)):
                for name in _WINDOW_FIELDS:
                    out[f"{p}{slot}.{name}"] = ((batch, h, frames * s, d), kv_dtype)
        else:
            out[p + "main"] = ((batch, h, d, d), torch.float32)
            out[p + "norm"] = ((batch, h, d, 1), torch.float32)
            out[p + "camera"] = ((batch, h, d, d), torch.float32)
            out[p + "k_tail"] = ((batch, config.conv_kernel_size - 1, s, c), dtype)
    return out


def layout_nbytes(layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size() for shape, dt in layout.values())
