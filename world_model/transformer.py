"""The SANA-WM Stage-1 DiT: hybrid Gated DeltaNet / softmax blocks with a dual camera branch.

Reads top-down: the temporal layout of a call, the two attention mixers (frame-wise Gated DeltaNet and
softmax, each with its UCPE camera branch), the block, the model. Reference: sana-wm.md A-C and L.

Three whole-sequence modes share one code path, differing only in how chunks see each other:

* ``bidirectional`` -- one chunk spanning every frame: GDN scans forwards and (exclusively) backwards over
  the whole clip, the short K conv and the FFN's temporal conv are symmetric, softmax attends to everything.
* ``chunk_causal`` -- the NVlabs chunk-causal teacher: chunks of 4, 3, 3, ... frames; GDN state, the K convs
  (main and camera) and the FFN temporal conv carry left context across chunks while the backward scan and
  the conv's anti-causal half stay inside the chunk; softmax blocks still attend to the whole sequence
  (sana-wm.md L.1) at 1/sqrt(D) in the main branch.
* ``streaming`` -- the streaming release: like ``chunk_causal`` for GDN, main K conv and FFN, but the camera K
  conv has no left context and the softmax blocks attend per chunk to [chunk 0, previous chunk, current
  chunk] at 1/sqrt(128) in both branches.

Each mixer takes and returns a small *carry* (recurrent states, conv tails, softmax K/V window), so the
cached chunk-by-chunk path runs the same code with the carry taken from a session's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .camera import CameraInputs, camera_inputs, invert_se3, ray_transforms
from .config import TransformerConfig
from .modules import (
    CaptionEmbedder,
    CrossAttention,
    FinalLayer,
    GLUMBConvTemp,
    PatchEmbed,
    RMSNorm,
    RotaryTable,
    TemporalShortConv,
    TimestepEmbedding,
    apply_rope,
    apply_ucpe,
)
from .ops.attention import reference_sdpa
from .ops.gated_delta import frame_gated_delta_bidirectional

if TYPE_CHECKING:
    from .state import SessionState

MODES = ("bidirectional", "chunk_causal", "streaming")


# ---------------------------------------------------------------------------------------------------------
# Temporal layout of one call
# ---------------------------------------------------------------------------------------------------------


def chunk_bounds(frames: int, first: int, size: int) -> tuple[tuple[int, int], ...]:
    """Chunks ``[start, end)`` of the chunk-causal models: ``first`` frames, then ``size`` each.

    As in NVlabs' ``first_chunk_plus_one`` split, a shorter remainder joins the last chunk.
    """
    starts = [0] + list(range(first, frames, size)) if frames > first else [0]
    if len(starts) > 1 and frames - starts[-1] < size:
        starts.pop()
    return tuple(zip(starts, starts[1:] + [frames]))


@dataclass(frozen=True)
class Layout:
    """How the latent frames of one call are grouped and where they sit in the session."""

    mode: str  # one of MODES
    height: int  # latent rows
    width: int  # latent columns
    chunks: tuple[tuple[int, int], ...]  # [start, end) of each chunk, in frames of this call
    # Absolute latent index of this call's frame 0 (the RoPE time position): one for the batch, or one per
    # batch element when sessions at different points share a forward.
    first_frame: int | tuple[int, ...] = 0

    @property
    def frames(self) -> int:
        return self.chunks[-1][1]

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width


# ---------------------------------------------------------------------------------------------------------
# Carries: what a mixer needs from the frames before this call
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GDNCarry:
    """Left context of a Gated DeltaNet mixer (all None at the start of a session)."""

    main: torch.Tensor | None = None  # (B, H, D, D) fp32 numerator state, [K, V] layout
    norm: torch.Tensor | None = None  # (B, H, D, 1) fp32 normaliser state
    camera: torch.Tensor | None = None  # (B, H, D, D) fp32 camera-branch state, [K, V] layout
    k_tail: torch.Tensor | None = None  # (B, K-1, S, C) last raw K frames before the short conv
    k_cam_tail: torch.Tensor | None = None  # (B, K-1, S, C) same for the camera K (chunk_causal teacher only)


@dataclass
class WindowKV:
    """Post-RoPE main K/V and post-UCPE camera K/V of one chunk, ``(B, H, n, D)`` in the SDPA dtype."""

    k: torch.Tensor
    v: torch.Tensor
    k_cam: torch.Tensor
    v_cam: torch.Tensor

    @staticmethod
    def cat(parts: list["WindowKV"]) -> "WindowKV":
        return WindowKV(*(torch.cat([getattr(p, n) for p in parts], dim=2) for n in ("k", "v", "k_cam", "v_cam")))

    def tokens(self, start: int, end: int) -> "WindowKV":
        return WindowKV(self.k[:, :, start:end], self.v[:, :, start:end], self.k_cam[:, :, start:end], self.v_cam[:, :, start:end])


@dataclass
class SoftmaxCarry:
    """The streaming softmax window: the sink chunk 0 and the previous chunk (None when it is the sink)."""

    sink: WindowKV | None = None
    prev: WindowKV | None = None


@dataclass
class BlockCarry:
    mixer: GDNCarry | SoftmaxCarry
    ffn_tail: torch.Tensor | None = None  # (B, t_kernel//2, S, C) last pre-t_conv FFN frames


# ---------------------------------------------------------------------------------------------------------
# Attention mixers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CameraContext:
    """UCPE inputs shared by every block of a call."""

    to_ray: torch.Tensor  # (B, N, 4, 4) P: world -> ray-local per token (decodes the output)
    to_ray_t: torch.Tensor  # (B, N, 4, 4) P^T (encodes queries)
    to_ray_inv: torch.Tensor  # (B, N, 4, 4) P^-1 (encodes keys and values)
    rope: torch.Tensor  # (N, D/4) complex RoPE of the camera half
    diffusers_math: bool  # rescale to pre-UCPE RMS as diffusers 0.42.1 does


class _MixerBase(nn.Module):
    """Parameters shared by both mixers (the softmax mixer keeps the unused GDN gates so checkpoints load)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c, heads = config.hidden_size, config.heads
        self.heads = heads
        self.head_dim = config.linear_head_dim
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.proj = nn.Linear(c, c)
        self.q_norm = RMSNorm(c, eps=1e-5)
        self.k_norm = RMSNorm(c, eps=1e-5)
        self.beta_proj = nn.Linear(c, heads)
        self.gate_proj = nn.Linear(c, heads)
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.register_buffer("recall_gate", torch.zeros(1))  # unused; present in checkpoints
        self.output_gate = nn.Linear(c, c)
        self.q_proj_cam = nn.Linear(c, c)
        self.k_proj_cam = nn.Linear(c, c)
        self.v_proj_cam = nn.Linear(c, c)
        self.out_proj_cam = nn.Linear(c, c)
        self.q_norm_cam = RMSNorm(c, eps=1e-5)
        self.k_norm_cam = RMSNorm(c, eps=1e-5)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` -> ``(B, H, N, D)``."""
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def finish(self, main: torch.Tensor, camera: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Sum the branches (camera output in world space, ``(B, H, N, D)``), gate, project."""
        merge = lambda t: t.transpose(1, 2).flatten(2)  # (B, H, N, D) -> (B, N, C)
        out = merge(main).to(x.dtype) + self.out_proj_cam(merge(camera).to(x.dtype))
        out = out * F.silu(self.output_gate(x).float())
        return self.proj(out.to(x.dtype))


def _ucpe_encode(q, k, v, cam: CameraContext):
    """UCPE-encode camera q, k, v ``(B, H, N, D)`` in fp32; diffusers' port also rescales to the input RMS."""
    q_hat = apply_ucpe(q.float(), cam.to_ray_t, cam.rope)
    k_hat = apply_ucpe(k.float(), cam.to_ray_inv, cam.rope)
    v_hat = apply_ucpe(v.float(), cam.to_ray_inv, cam.rope)
    if cam.diffusers_math:
        q_hat, k_hat, v_hat = (_rescale_to_rms(ref, t) for ref, t in ((q, q_hat), (k, k_hat), (v, v_hat)))
    return q_hat, k_hat, v_hat


def _rescale_to_rms(reference: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    ref = reference.float().square().mean(-1, keepdim=True).add(eps).sqrt()
    cur = x.square().mean(-1, keepdim=True).add(eps).sqrt()
    return x * (ref / cur.clamp_min(eps)).clamp(max=1.0)


def _frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``(B, H, N, D)`` -> ``(B, H, T, S, D)``."""
    batch, heads, tokens, dim = x.shape
    return x.view(batch, heads, frames, tokens // frames, dim)


def _tokens_by_frame(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, T, S, C)``."""
    return x.view(x.shape[0], layout.frames, layout.tokens_per_frame, x.shape[-1])


class GatedDeltaMixer(_MixerBase):
    """Frame-wise Gated DeltaNet with a single-path UCPE camera branch (sana-wm.md B)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.eps = config.gdn_eps
        self.conv_k = TemporalShortConv(config.hidden_size, config.conv_kernel_size)
        self.conv_k_cam = TemporalShortConv(config.hidden_size, config.conv_kernel_size)

    def gates(self, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """beta ``(B, H, T, S)`` per token and decay ``(B, H, T)`` per frame, fp32."""
        frames = _tokens_by_frame(x, layout)
        beta = torch.sigmoid(self.beta_proj(frames)).float().permute(0, 3, 1, 2)
        gate = self.gate_proj(frames.mean(dim=2)).float()  # (B, T, H)
        decay = torch.exp(-torch.exp(self.A_log.float()) * F.softplus(gate + self.dt_bias.float()))
        return beta, decay.transpose(1, 2)

    def short_conv(self, conv: TemporalShortConv, raw: torch.Tensor, layout: Layout, tail: torch.Tensor | None, carry_across: bool):
        """The K short conv over the chunks of the call; returns ``(out (B, N, C), new tail)``."""
        out, tail = _over_chunks(conv, _tokens_by_frame(raw, layout), layout, tail, conv.context, carry_across)
        return out.flatten(1, 2), tail

    def forward(self, x: torch.Tensor, layout: Layout, rope: torch.Tensor, cam: CameraContext, carry: GDNCarry):
        new = GDNCarry()
        beta, decay = self.gates(x, layout)
        scale = self.head_dim**-0.5 * layout.tokens_per_frame**-0.5

        # Main branch: qkv -> K conv -> RMSNorm -> ReLU; keys scaled by 1/sqrt(D S); RoPE on the numerator only.
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        k, new.k_tail = self.short_conv(self.conv_k, k, layout, carry.k_tail, carry_across=layout.mode != "bidirectional")
        q = self.split_heads(F.relu(self.q_norm(q))).float()
        k = self.split_heads(F.relu(self.k_norm(k))).float() * scale
        v = self.split_heads(v).float()
        q_rot, k_rot = apply_rope(q, rope), apply_rope(k, rope)

        # Camera branch: same prep on its own projections; the K conv carries context only in the teacher.
        qc, kc, vc = self.q_proj_cam(x), self.k_proj_cam(x), self.v_proj_cam(x)
        cam_carry = layout.mode == "chunk_causal"
        kc, new.k_cam_tail = self.short_conv(self.conv_k_cam, kc, layout, carry.k_cam_tail, carry_across=cam_carry)
        qc = self.split_heads(F.relu(self.q_norm_cam(qc))).float()
        kc = self.split_heads(F.relu(self.k_norm_cam(kc))).float() * scale
        vc = self.split_heads(vc).float()
        q_hat, k_hat, v_hat = _ucpe_encode(qc, kc, vc, cam)
        # Dynamic beta discount: divide by the frame-mean key-norm inflation that UCPE causes (>= 1).
        inflation = (k_hat.norm(dim=-1).clamp_min(1e-6) / kc.norm(dim=-1).clamp_min(1e-6)) ** 2  # (B, H, N)
        inflation = _frames(inflation.unsqueeze(-1), layout.frames)[..., 0].mean(-1)  # (B, H, T)
        beta_cam = beta / inflation.clamp_min(1.0).unsqueeze(-1)

        frames = lambda t: _frames(t, layout.frames)
        q, k, v, q_rot, k_rot = map(frames, (q, k, v, q_rot, k_rot))
        q_hat, k_hat, v_hat = map(frames, (q_hat, k_hat, v_hat))
        ones = torch.ones_like(v[..., :1])
        num, den, out_cam = [], [], []
        new.main, new.norm, new.camera = carry.main, carry.norm, carry.camera
        for start, end in layout.chunks:
            sl = slice(start, end)
            scan = lambda qq, kk, vv, bb, state: _bidirectional_scan(qq[:, :, sl], kk[:, :, sl], vv[:, :, sl], bb[:, :, sl], decay[:, :, sl], state)
            n, new.main = scan(q_rot, k_rot, v, beta, new.main)
            d, new.norm = scan(q, k, ones, beta, new.norm)
            c, new.camera = scan(q_hat, k_hat, v_hat, beta_cam, new.camera)
            num.append(n), den.append(d), out_cam.append(c)
        main = torch.cat(num, dim=2) / (torch.cat(den, dim=2) + self.eps)
        camera = apply_ucpe(torch.cat(out_cam, dim=2).flatten(2, 3), cam.to_ray, cam.rope, inverse_rope=True)
        return self.finish(main.flatten(2, 3), camera, x), new


def _advance(frames: int | tuple[int, ...], by: int) -> int | tuple[int, ...]:
    return tuple(f + by for f in frames) if isinstance(frames, tuple) else frames + by


def _turn_rows(m: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Rotate the row pairs of ``(..., D, E)`` matrices (a state's K side) by ``turn`` ``(D/2,)``."""
    return apply_rope(m.transpose(-1, -2), turn).transpose(-1, -2)


def _turn_second_half(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([x[..., :half], apply_rope(x[..., half:], turn)], dim=-1)


def _bidirectional_scan(q, k, v, beta, decay, state):
    """Forward scan from ``state`` plus the exclusive backward scan inside the chunk (one kernel launch on CUDA)."""
    return frame_gated_delta_bidirectional(q, k, v, beta, decay, initial_state=state)


def _over_chunks(apply, x: torch.Tensor, layout: Layout, tail: torch.Tensor | None, context: int, carry_across: bool):
    """``apply(chunk, left)`` on each chunk of ``x`` ``(B, T, S, C)``, threading the last ``context`` frames.

    ``left`` is the tail of the frames before the chunk when context carries across chunks, else None
    (the op then zero-pads). Returns the outputs joined over frames and the tail after the call.
    """
    outs = []
    for start, end in layout.chunks:
        chunk = x[:, start:end]
        outs.append(apply(chunk, tail if carry_across else None))
        if carry_across:
            history = chunk if tail is None else torch.cat([tail.to(chunk.dtype), chunk], dim=1)
            tail = _last_frames(history, context)
    return torch.cat(outs, dim=1), tail


def _last_frames(x: torch.Tensor, count: int) -> torch.Tensor:
    """The last ``count`` frames of ``(B, T, S, C)``, zero-padded in front when T < count."""
    if x.shape[1] >= count:
        return x[:, -count:]
    return torch.cat([x.new_zeros(x.shape[0], count - x.shape[1], *x.shape[2:]), x], dim=1)


class SoftmaxMixer(_MixerBase):
    """Softmax attention with a UCPE camera branch (blocks 3, 7, 11, 15, 19 of the release)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.low_precision = config.softmax_bf16

    def forward(self, x: torch.Tensor, layout: Layout, rope: torch.Tensor, cam: CameraContext, carry: SoftmaxCarry):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = apply_rope(self.split_heads(self.q_norm(q)), rope)
        k = apply_rope(self.split_heads(self.k_norm(k)), rope)
        v = self.split_heads(v)
        qc = self.split_heads(self.q_norm_cam(self.q_proj_cam(x)))
        kc = self.split_heads(self.k_norm_cam(self.k_proj_cam(x)))
        vc = self.split_heads(self.v_proj_cam(x))
        q_hat, k_hat, v_hat = _ucpe_encode(qc, kc, vc, cam)

        if layout.mode == "streaming":
            main, camera, carry = self._windowed(layout, carry, q, q_hat, WindowKV(k, v, k_hat, v_hat))
        else:
            # Teacher and bidirectional: the whole sequence; the main branch keeps 1/sqrt(D).
            main = reference_sdpa(q, k, v, pad_heads=False, low_precision=self.low_precision)
            camera = reference_sdpa(q_hat, k_hat, v_hat, pad_heads=True, low_precision=self.low_precision)
        camera = apply_ucpe(camera.float(), cam.to_ray, cam.rope, inverse_rope=True)
        return self.finish(main, camera, x), carry

    def _windowed(self, layout: Layout, carry: SoftmaxCarry, q, q_hat, kv: WindowKV):
        """Each chunk attends to [sink chunk 0, previous chunk, itself], all at 1/sqrt(128)."""
        if self.low_precision:  # cache in the reference's SDPA dtype
            kv = WindowKV(*(t.bfloat16() for t in (kv.k, kv.v, kv.k_cam, kv.v_cam)))
        sink, prev = carry.sink, carry.prev
        tokens = layout.tokens_per_frame
        main, camera = [], []
        for start, end in layout.chunks:
            sl = slice(start * tokens, end * tokens)
            current = kv.tokens(sl.start, sl.stop)
            window = WindowKV.cat([w for w in (sink, prev) if w is not None] + [current])
            main.append(reference_sdpa(q[:, :, sl], window.k, window.v, pad_heads=True, low_precision=self.low_precision))
            camera.append(reference_sdpa(q_hat[:, :, sl], window.k_cam, window.v_cam, pad_heads=True, low_precision=self.low_precision))
            sink, prev = (current, None) if sink is None else (sink, current)
        return torch.cat(main, dim=2), torch.cat(camera, dim=2), SoftmaxCarry(sink=sink, prev=prev)


# ---------------------------------------------------------------------------------------------------------
# Block and model
# ---------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """adaLN-single block: modulate, mix, gated residual; Plücker injection; text cross-attention; FFN."""

    def __init__(self, config: TransformerConfig, index: int) -> None:
        super().__init__()
        c = config.hidden_size
        self.is_softmax = config.is_softmax_block(index)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)
        self.attn = SoftmaxMixer(config) if self.is_softmax else GatedDeltaMixer(config)
        uses_plucker = config.chunk_plucker_post_attn_blocks < 0 or index < config.chunk_plucker_post_attn_blocks
        self.plucker_proj = nn.Linear(c, c) if uses_plucker else None
        self.cross_attn = CrossAttention(c, config.num_attention_heads)
        self.mlp = GLUMBConvTemp(c, int(c * config.mlp_ratio), config.t_kernel_size)

    def new_carry(self) -> BlockCarry:
        return BlockCarry(mixer=SoftmaxCarry() if self.is_softmax else GDNCarry())

    def forward(self, x, t_mod, text_kv, text_mask, plucker, layout: Layout, rope, cam: CameraContext, carry: BlockCarry):
        # x: (B, N, C); t_mod: (B, T, 6, C) per-frame modulation
        batch, tokens, channels = x.shape
        frames = layout.frames
        mods = (self.scale_shift_table + t_mod).unsqueeze(3)  # (B, T, 6, 1, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(2)

        h = F.layer_norm(x, (channels,), eps=1e-6).view(batch, frames, -1, channels)
        h = (h * (1 + scale_msa) + shift_msa).view(batch, tokens, channels)
        attn, mixer_carry = self.attn(h, layout, rope, cam, carry.mixer)
        x = x + (gate_msa * attn.view(batch, frames, -1, channels)).view(batch, tokens, channels)
        if self.plucker_proj is not None:
            x = x + self.plucker_proj(plucker)
        x = x + self.cross_attn(x, text_kv, text_mask)

        h = F.layer_norm(x, (channels,), eps=1e-6).view(batch, frames, -1, channels)
        h = h * (1 + scale_mlp) + shift_mlp  # (B, T, S, C)
        y = self.mlp.spatial(h, layout.height, layout.width)
        ffn, ffn_tail = self._ffn_temporal(y, layout, carry.ffn_tail)
        x = x + (gate_mlp * ffn).view(batch, tokens, channels)
        return x, BlockCarry(mixer=mixer_carry, ffn_tail=ffn_tail)

    def _ffn_temporal(self, y: torch.Tensor, layout: Layout, tail: torch.Tensor | None):
        carry_across = layout.mode != "bidirectional"
        return _over_chunks(self.mlp.temporal, y, layout, tail, self.mlp.context, carry_across)


class SanaWMTransformer(nn.Module):
    """The Stage-1 DiT. ``forward`` follows interface.md ("Python API")."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.t_embedder = TimestepEmbedding(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.x_embedder = PatchEmbed(config.in_channels, c)
        self.y_embedder = CaptionEmbedder(config.caption_channels, c)
        self.attention_y_norm = RMSNorm(c, eps=1e-5)
        self.plucker_embedder = PatchEmbed(config.chunk_plucker_channels, c)
        self.raymap_embedder = PatchEmbed(3, c)  # in every checkpoint; unused while the Plücker branch is on
        self.rope = RotaryTable(config.linear_head_dim, config.rope_max_frames, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_layer = FinalLayer(c, config.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def layout(self, mode: str, frames: int, latent_hw: tuple[int, int], first_frame: int = 0) -> Layout:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "bidirectional":
            chunks = ((0, frames),)
        else:
            chunks = chunk_bounds(frames, self.config.first_chunk_frames, self.config.chunk_frames)
        return Layout(mode, *latent_hw, chunks=chunks, first_frame=first_frame)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        c2w: torch.Tensor,
        intrinsics: torch.Tensor,
        mode: str = "bidirectional",
        *,
        state: "SessionState | None" = None,
        start_frame: int = 0,
        write_state: bool = False,
    ) -> torch.Tensor:
        """Velocity ``v = eps - x0`` ``(B, C, T, H, W)``.

        Without ``state``: a whole sequence of latent frames 0 .. T-1 in ``mode``. With ``state`` (streaming
        only): one chunk holding latent frames ``start_frame .. start_frame+T-1`` of the session, continuing
        from ``state``; ``write_state=True`` (the clean t = 0 pass) advances the state in place.

        ``c2w`` ``(B, F, 4, 4)`` OpenCV camera-to-world and ``intrinsics`` ``(B, F, 4)`` (fx, fy, cx, cy in
        pixels of the ``32 H x 32 W`` video) per pixel frame from the session's frame 0, ``F >= 8 (s+T-1) + 1``.
        """
        self._check_latents(latents)
        frames, height, width = latents.shape[2:]
        if state is None:
            camera = camera_inputs(c2w, intrinsics, frames, (height, width))
            velocity, _ = self.run(latents, timestep, text, text_mask, camera, self.layout(mode, frames, (height, width)))
            return velocity
        if mode != "streaming":
            raise ValueError(f"a session state is only used in streaming mode, not {mode!r}")
        if start_frame != state.next_frame:
            raise ValueError(f"this state continues at latent frame {state.next_frame}, not {start_frame}")
        camera = camera_inputs(c2w, intrinsics, frames, (height, width), first_latent=start_frame)
        return self.stream_chunk(latents, timestep, text, text_mask, camera, state, write_state=write_state)

    def stream_chunk(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        camera: CameraInputs,
        state: "SessionState",
        *,
        write_state: bool = False,
    ) -> torch.Tensor:
        """One streaming chunk continuing ``state`` (whose ``next_frame`` gives each session's position),
        with ``camera`` already built for exactly these frames. ``write_state`` advances the state in place."""
        self._check_latents(latents)
        frames, height, width = latents.shape[2:]
        layout = Layout("streaming", height, width, chunks=((0, frames),), first_frame=state.next_frame)
        velocity, carries = self.run(latents, timestep, text, text_mask, camera, layout, state.carries)
        if write_state:
            state.carries = carries
            state.next_frame = _advance(state.next_frame, frames)
        return velocity

    def rebase_state(self, state: "SessionState", delta: int) -> None:
        """Move a session ``delta`` latent frames back in RoPE time, in place, so it can run past the table.

        Every cached key (and camera-branch value) carries its absolute time rotation; turning them all by
        ``-delta`` while the next chunk's positions drop by ``delta`` leaves every query-key angle, and so
        the output, unchanged (up to float rounding) - the session continues as if the table were endless.
        """
        turn = self.rope.time_shift(-delta)
        cam_turn = self.rope.camera_slice(turn)
        for carry in state.carries:
            mixer = carry.mixer
            if isinstance(mixer, GDNCarry):
                if mixer.main is not None:
                    mixer.main = _turn_rows(mixer.main, turn)
                if mixer.camera is not None:  # K rows and V columns: RoPE on the second half of each
                    cam = _turn_second_half(mixer.camera, cam_turn)
                    mixer.camera = _turn_second_half(cam.transpose(-1, -2), cam_turn).transpose(-1, -2)
            else:
                for slot in ("sink", "prev"):
                    window = getattr(mixer, slot)
                    if window is not None:
                        setattr(mixer, slot, WindowKV(
                            apply_rope(window.k, turn), window.v, _turn_second_half(window.k_cam, cam_turn), _turn_second_half(window.v_cam, cam_turn)
                        ))
        state.next_frame = _advance(state.next_frame, -delta)

    def new_carries(self) -> list[BlockCarry]:
        return [block.new_carry() for block in self.blocks]

    def new_state(self, batch_size: int = 1) -> "SessionState":
        """An empty per-session state (its tensors appear with the first ``write_state=True`` call)."""
        from .state import SessionState

        del batch_size  # the batch size is fixed by the first chunk written
        return SessionState(self.new_carries())

    def run(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        camera: CameraInputs,
        layout: Layout,
        carries: list[BlockCarry] | None = None,
    ) -> tuple[torch.Tensor, list[BlockCarry]]:
        """The DiT over ``layout.frames`` latent frames, continuing from ``carries`` (a fresh session if None).

        ``camera`` covers exactly this call's frames. Returns the velocity and the carries after this call.
        """
        batch, _, frames, height, width = latents.shape
        dtype = self.dtype
        if carries is None:
            carries = self.new_carries()
        x = self.x_embedder(latents.to(dtype))  # (B, N, C), tokens ordered (frame, row, column)

        t = self._timesteps(timestep, batch, frames).to(latents.device)
        t_emb = self.t_embedder(t)  # (B, T, C)
        t_mod = self.t_block(t_emb).view(batch, frames, 6, -1)

        y = self.attention_y_norm(self.y_embedder(text.to(dtype)))
        text_mask = text_mask.to(device=y.device).bool()
        plucker = self.plucker_embedder(camera.plucker.to(device=x.device, dtype=dtype))

        rope = self.rope(layout.first_frame, frames, height, width, x.device)
        to_ray = ray_transforms(camera.raymap.to(x.device).float(), (height, width))
        cam = CameraContext(
            to_ray=to_ray,
            to_ray_t=to_ray.transpose(-1, -2),
            to_ray_inv=invert_se3(to_ray),
            rope=self.rope.camera_slice(rope),
            diffusers_math=self.config.camera_math == "diffusers",
        )

        new_carries = []
        for block, carry in zip(self.blocks, carries):
            x, carry = block(x, t_mod, block.cross_attn.text_kv(y), text_mask, plucker, layout, rope, cam, carry)
            new_carries.append(carry)

        out = self.final_layer(x.view(batch, frames, height * width, -1), t_emb)  # (B, T, S, C_out)
        out = out.view(batch, frames, height, width, -1).permute(0, 4, 1, 2, 3)
        return out, new_carries

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.in_channels:
            raise ValueError(
                f"latents must be (B, {self.config.in_channels}, T, H, W); got {tuple(latents.shape)}"
            )

    @staticmethod
    def _timesteps(timestep: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """Per-frame timesteps ``(B, T)``, truncated to integers as the reference does before embedding."""
        t = torch.as_tensor(timestep)
        if t.ndim == 3:  # (B, 1, T), the reference's layout
            t = t[:, 0]
        if t.ndim <= 1:
            t = t.reshape(-1, 1).expand(batch, frames)
        if tuple(t.shape) != (batch, frames):
            raise ValueError(f"timestep must be (B,), (B, T) or (B, 1, T) with B={batch}, T={frames}; got {tuple(timestep.shape)}")
        return t.long().float()
