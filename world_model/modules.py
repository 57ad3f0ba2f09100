"""Building blocks of the Stage-1 DiT that are not the attention mixers.

Parameter names match the released checkpoints in diffusers naming (sana-wm.md A.3), so a state dict
loads without renaming; the NVlabs naming is mapped in ``checkpoint.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F



class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned weight, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps, cos first then sin (PixArt / diffusers ``flip_sin_to_cos``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """256 sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text features (caption_channels) -> C, as ``y_embedder.y_proj``."""

    def __init__(self, caption_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PatchEmbed(nn.Module):
    """A 1x1x1 Conv3d from ``(B, C_in, T, H, W)`` to tokens ``(B, T*H*W, C)``."""

    def __init__(self, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RotaryTable(nn.Module):
    """3-D RoPE of the self-attention (``wan_rope``): complex rotations per (frame, row, column).

    The head dim D splits into pairs for time, height and width: h = w = D // 6 pairs, t = D/2 - 2 (D // 6)
    (112 -> 20/18/18 pairs, i.e. 40/36/36 dims). Each axis has its own table with frequency
    theta^(-2j / dim_axis). The table is not a buffer, so a dtype cast of the module leaves it complex.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        h_pairs = head_dim // 6
        t_pairs = head_dim // 2 - 2 * h_pairs
        self.pairs = (t_pairs, h_pairs, h_pairs)
        self.max_len = max_len
        cpu = torch.device("cpu")  # real values even when the module is built on the meta device
        pos = torch.arange(max_len, dtype=torch.float32, device=cpu)
        tables, self.freqs = [], []
        for pairs in self.pairs:
            dim = 2 * pairs
            freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=cpu)[:pairs] / dim))
            self.freqs.append(freqs)
            tables.append(torch.polar(torch.ones(max_len, pairs, device=cpu), torch.outer(pos, freqs)))
        self.tables = tables  # three (max_len, pairs) complex64 tables
        self._device_tables: dict[torch.device, list[torch.Tensor]] = {}

    def _tables_on(self, device: torch.device) -> list[torch.Tensor]:
        """The tables on ``device``, copied there once."""
        if device.type == "cpu":
            return self.tables
        if device not in self._device_tables:
            self._device_tables[device] = [tab.to(device) for tab in self.tables]
        return self._device_tables[device]

    def forward(self, first_frame: int | tuple[int, ...], frames: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Rotations for ``frames`` frames from ``first_frame``, tokens ordered (frame, row, column).

        One ``first_frame`` for the batch gives ``(N, D/2)`` complex; one per batch element (sessions at
        different frames in one batch) gives ``(B, 1, N, D/2)``, which broadcasts over heads in
        :func:`apply_rope`. The range is checked on the host, so a forward never waits on the device for it.
        """
        firsts = first_frame if isinstance(first_frame, tuple) else (first_frame,)
        if min(firsts) < 0 or max(firsts) + frames > self.max_len or max(height, width) > self.max_len:
            raise ValueError(f"RoPE positions outside the {self.max_len}-entry table; re-base the session's frames")
        t_tab, h_tab, w_tab = self._tables_on(torch.device(device))
        if isinstance(first_frame, tuple):
            frame_positions = torch.arange(frames, device=device) + torch.tensor(first_frame, device=device)[:, None]
        else:
            frame_positions = torch.arange(first_frame, first_frame + frames, device=device)
        lead = frame_positions.shape[:-1]
        grid = (*lead, frames, height, width)
        parts = [
            t_tab[frame_positions].view(*lead, frames, 1, 1, -1).expand(*grid, -1),
            h_tab[:height].view(height, 1, -1).expand(*grid, -1),
            w_tab[:width].view(width, -1).expand(*grid, -1),
        ]
        out = torch.cat(parts, dim=-1).reshape(*lead, frames * height * width, -1)
        return out[:, None] if lead else out

    def time_shift(self, delta: int) -> torch.Tensor:
        """``(D/2,)`` complex rotation that moves a rotated vector ``delta`` frames later in time (only the
        time pairs turn). Rotations compose exactly, so cached keys can be re-based by any ``delta``."""
        t_pairs, h_pairs, w_pairs = self.pairs
        turn = torch.polar(torch.ones(t_pairs), self.freqs[0].double().mul(delta).float())
        return torch.cat([turn, torch.ones(h_pairs + w_pairs, dtype=torch.complex64)])

    def camera_slice(self, rope: torch.Tensor) -> torch.Tensor:
        """The UCPE branch's RoPE on D/2 dims: the leading entries of each axis of the main table."""
        t_pairs, h_pairs, _ = self.pairs
        half = sum(self.pairs)  # the camera branch rotates D/2 dims, i.e. D/4 pairs
        ch = half // 6
        ct = half // 2 - 2 * ch
        return torch.cat(
            [rope[..., :ct], rope[..., t_pairs : t_pairs + ch], rope[..., t_pairs + h_pairs : t_pairs + h_pairs + ch]],
            dim=-1,
        )


def apply_rope(x: torch.Tensor, rope: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``(B, H, N, D)`` by ``rope`` ``(N, D/2)`` complex (in fp32)."""
    if torch.compiler.is_compiling():  # Inductor does not fuse complex ops: the same product in real arithmetic
        cos, sin = torch.view_as_real(rope).unbind(-1)
        sin = -sin if inverse else sin
        even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)
    freqs = rope.conj() if inverse else rope
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


def apply_ucpe(x: torch.Tensor, mats: torch.Tensor, rope: torch.Tensor, *, inverse_rope: bool = False) -> torch.Tensor:
    """UCPE on ``(B, H, N, D)``: 4x4 ``mats`` ``(B, N, 4, 4)`` on groups of 4 of the first half, RoPE on the rest."""
    batch, heads, tokens, dim = x.shape
    half = dim // 2
    projected, rotated = x[..., :half], x[..., half:]
    groups = projected.reshape(batch, heads, tokens, half // 4, 4)
    if torch.compiler.is_compiling():  # a fusable broadcast sum instead of many 4x4 matmuls
        projected = (mats[:, None, :, None] * groups.unsqueeze(-2)).sum(-1)
    else:
        projected = torch.einsum("bnij,bhngj->bhngi", mats, groups)
    return torch.cat([projected.reshape(batch, heads, tokens, half), apply_rope(rotated, rope, inverse=inverse_rope)], dim=-1)


class TemporalShortConv(nn.Module):
    """Depthwise conv of width K over frames, run causally and anti-causally (``conv_k``, ``conv_k_cam``).

    ``y[t] = sum_j w_j x[t-K+1+j]  +  sum_j w_j x[t+K-1-j]  -  w_{K-1} x[t]``: the causal pass may read
    ``left`` (the K-1 raw frames before the chunk; zeros when absent), the anti-causal pass stays in the chunk.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size))

    @property
    def context(self) -> int:
        return self.weight.shape[-1] - 1

    def forward(self, x: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
        # x: (B, T, S, C) one chunk; left: (B, K-1, S, C) or None. Shifted sums over frames in fp32, in the
        # tokens' own layout: with T of 1-4 frames a conv1d call is mostly permutes and copies.
        frames, pad = x.shape[1], self.context
        weight = self.weight[:, 0].float()  # (C, K)
        before = x.new_zeros(x.shape[0], pad, *x.shape[2:]) if left is None else left.to(x.dtype)
        seq = torch.cat([before, x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1).float()
        # tap K-1 reads frame t in both passes and is counted once; tap j < K-1 reads t-(K-1-j) and t+(K-1-j)
        out = seq[:, pad : pad + frames] * weight[:, pad]
        for j in range(pad):
            out = out + (seq[:, j : j + frames] + seq[:, 2 * pad - j : 2 * pad - j + frames]) * weight[:, j]
        return out.to(x.dtype)


class ConvLayer(nn.Module):
    """A 2-D conv wrapped as ``.conv`` (checkpoint names ``mlp.inverted_conv.conv.weight`` ...)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GLUMBConvTemp(nn.Module):
    """The FFN: per frame 1x1 conv + SiLU, 3x3 depthwise, GLU, 1x1 conv; then ``y + t_conv(y)`` over frames.

    The temporal conv reads ``left`` (the last frames of ``y`` before the chunk; zeros when absent) and
    zero-pads the chunk's right edge.
    """

    def __init__(self, channels: int, inner: int, t_kernel_size: int) -> None:
        super().__init__()
        self.inverted_conv = ConvLayer(channels, inner * 2, 1)
        self.depth_conv = ConvLayer(inner * 2, inner * 2, 3, groups=inner * 2)
        self.point_conv = ConvLayer(inner, channels, 1, bias=False)
        self.t_conv = nn.Conv2d(channels, channels, kernel_size=(t_kernel_size, 1), bias=False)

    @property
    def context(self) -> int:
        return self.t_conv.kernel_size[0] // 2

    def spatial(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, T, S, C)`` -> pre-t_conv output ``(B, T, S, C)``."""
        batch, frames, tokens, channels = x.shape
        h = x.reshape(batch * frames, height, width, channels).permute(0, 3, 1, 2)
        h = self.depth_conv(F.silu(self.inverted_conv(h)))
        value, gate = h.chunk(2, dim=1)
        h = self.point_conv(value * F.silu(gate))
        return h.permute(0, 2, 3, 1).reshape(batch, frames, tokens, channels)

    def temporal(self, y: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
        """``y + t_conv(y)`` for one chunk ``(B, T, S, C)``; ``left`` ``(B, k//2, S, C)`` or None."""
        pad = self.context
        left = torch.zeros_like(y[:, :pad]) if left is None else left.to(y.dtype)
        seq = torch.cat([left, y, torch.zeros_like(y[:, :pad])], dim=1)  # (B, T + 2 pad, S, C)
        conv = self.t_conv(seq.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, T, S, C)
        return y + conv


class CrossAttention(nn.Module):
    """Video queries attend to the text tokens (no gate; boolean padding mask)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(channels, channels)
        self.kv_linear = nn.Linear(channels, channels * 2)
        self.proj = nn.Linear(channels, channels)
        self.q_norm = RMSNorm(channels, eps=1e-6)
        self.k_norm = RMSNorm(channels, eps=1e-6)

    def text_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, heads, L, d)`` of the text; they depend on the prompt only."""
        batch, length, channels = y.shape
        k, v = self.kv_linear(y).view(batch, length, 2, channels).unbind(2)
        k = self.k_norm(k)
        return (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (k, v))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        q = self.q_norm(self.q_linear(x)).view(batch, tokens, self.heads, -1).transpose(1, 2)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class FinalLayer(nn.Module):
    """LayerNorm, per-frame (shift, scale) from ``t`` and a 2xC table, Linear C -> latent channels."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, channels) / channels**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x: (B, T, S, C); t: (B, T, C)
        shift, scale = (self.scale_shift_table[None, None] + t[:, :, None]).unbind(2)  # (B, T, C) each
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.linear(h)

