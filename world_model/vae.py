"""The LTX-2 video VAE with a causal, chunk-by-chunk (streaming) decoder.

The network is diffusers' ``AutoencoderKLLTX2Video`` used as is (sana-wm.md D): 32x spatial and 8x
temporal compression, pixel frames = 8k+1 for k+1 latent frames. The streaming release decodes it
causally and chunk by chunk; this module adds that without copying the decoder's forward:

* every ``LTX2VideoCausalConv3d`` of the decoder gets a forward that, while a streaming session is
  active, takes its left temporal context from the session's ``DecoderCache`` (the last k_t - 1 input
  frames of the previous chunk) instead of replicating the chunk's first frame;
* every temporal depth-to-space upsampler drops its first (s_t - 1) output frames, which is right for
  the start of the video only. For later chunks it is fed one placeholder frame in front of the chunk
  (its conv skips that frame and emits zeros for it) and the one surviving placeholder output frame
  is dropped, so all s_t frames of every input frame come out.

Without an active session the diffusers forwards run unchanged, so ``decode`` is diffusers' own
one-shot causal decode, and streaming equals it up to float rounding. The active session is held in
a ``ContextVar``, so threads or tasks sharing one model may decode different sessions. The decoder
must not be ``torch.compile``'d (sana-wm.md J.8).
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLLTX2Video
from diffusers.models.autoencoders.autoencoder_kl_ltx2 import LTX2VideoCausalConv3d, LTX2VideoUpsampler3d
from torch import nn

from .checkpoint import CheckpointError, check_state_dict, read_json_object

__all__ = ["VAE_PRESETS", "DecoderCache", "VideoVAE", "vae_config"]

# The LTX-2.0 video VAE: diffusers' LTX-2.0 conversion config (scripts/convert_ltx2_to_diffusers.py),
# which equals the ``AutoencoderKLLTX2Video`` constructor defaults except that the defaults leave the
# compression ratios to a formula that gives 64x/16x for this layout (it assumes every encoder stage
# scales both ways). The decoder is made causal here, as the streaming release's ``ltx2_causal_vae``.
_LTX2 = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "block_out_channels": (256, 512, 1024, 2048),
    "down_block_types": ("LTX2VideoDownBlock3D",) * 4,
    "decoder_block_out_channels": (256, 512, 1024),
    "layers_per_block": (4, 6, 6, 2, 2),
    "decoder_layers_per_block": (5, 5, 5, 5),
    "spatio_temporal_scaling": (True, True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True),
    "upsample_factor": (2, 2, 2),
    "timestep_conditioning": False,
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "scaling_factor": 1.0,
    "encoder_causal": True,
    "decoder_causal": True,
    "encoder_spatial_padding_mode": "zeros",
    "decoder_spatial_padding_mode": "reflect",
    "spatial_compression_ratio": 32,
    "temporal_compression_ratio": 8,
}

# Same stages (so the same 32x / 8x compression), tiny widths and one resnet per block: for tests.
_TINY = {
    **_LTX2,
    "latent_channels": 16,
    "block_out_channels": (8, 16, 32, 32),
    "decoder_block_out_channels": (8, 16, 32),
    "layers_per_block": (1, 1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1),
    "scaling_factor": 0.5,  # not 1, so that tests exercise the normalisation
}

# The tiny layout a little wider, with the decoder wider than the encoder (reconstruction needs the
# capacity, encoding a procedural scene does not): ~4.9 M parameters, the VAE of the "demo" model.
_DEMO = {
    **_TINY,
    "block_out_channels": (16, 32, 64, 128),
    "decoder_block_out_channels": (32, 64, 128),
    "scaling_factor": 1.0,
}

# The demo VAE with 4x the latent channels at the same 32x / 8x compression (so the DiT sees the same tokens):
# 64 values per 32x32x8-pixel cell instead of 16, the bottleneck that made the 8 frames of a latent decode
# nearly alike (issue 9). 64, not LTX-2's 128: LTX-2 pairs 128 channels with a 2240-wide DiT, the demo DiT is
# 256 wide. The decoder's last stage (1/4 resolution, every pixel frame) is twice as wide: its temporal
# upsampler turns 32 channels into 256 (8 sub-frames of 32) instead of 128 (8 of 16), since that stage makes
# the motion between the frames of a latent. The encoder has no mid-block (its last ``layers_per_block``
# entry is 0): encoding procedural scenes needs little capacity, and without those 0.9 M parameters the DiT and
# this VAE ship in 29.3 MB. About 2x the decode arithmetic of "demo", 4.8 M parameters.
_DEMO_WIDE = {
    **_DEMO,
    "latent_channels": 64,
    "layers_per_block": (1, 1, 1, 1, 0),
    "upsample_factor": (1, 2, 2),  # listed from the full-resolution stage up; 1 keeps its width at 32
}

VAE_PRESETS: dict[str, dict[str, Any]] = {"ltx2": _LTX2, "tiny": _TINY, "demo": _DEMO, "demo-wide": _DEMO_WIDE}

# ``config.json`` classes we read: diffusers' VAE and NVlabs' causal copy of it (same weights).
_CLASS_NAMES = frozenset({"AutoencoderKLLTX2Video", "AutoencoderKLCausalLTX2Video"})
# NVlabs config keys that do not describe the network.
_TRAINING_ONLY_KEYS = frozenset({"gradient_checkpointing"})
_INIT_KEYS = frozenset(inspect.signature(AutoencoderKLLTX2Video.__init__).parameters) - {"self"}


def vae_config(name: str) -> dict[str, Any]:
    """A copy of the constructor arguments of preset ``name`` (a key of ``VAE_PRESETS``)."""
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r} (known: {', '.join(VAE_PRESETS)})")
    return copy.deepcopy(VAE_PRESETS[name])


# ----------------------------------------------------------------------------------------------
# The per-session decoder cache
# ----------------------------------------------------------------------------------------------


class DecoderCache:
    """What a batch of streaming sessions needs to continue decoding: per causal conv of the decoder,
    its last (k_t - 1) input frames, ``(B, C, k_t - 1, h, w)``, keyed by the conv's module name.

    A new cache is empty ("not started"); the first chunk fills it and later chunks replace its
    tensors with ones of the same shapes, so its size does not grow with the number of chunks.
    """

    def __init__(self, frames: Mapping[str, torch.Tensor] | None = None) -> None:
        self.frames: dict[str, torch.Tensor] = dict(frames or {})

    @property
    def started(self) -> bool:
        """Whether the first chunk (the one holding latent frame 0) has been decoded into it."""
        return bool(self.frames)

    @property
    def batch_size(self) -> int | None:
        """The number of sessions it holds; ``None`` before the first chunk (it fits any batch)."""
        return next(iter(self.frames.values())).shape[0] if self.frames else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.frames.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors by name, ready for ``safetensors.torch.save_file`` (empty before the first chunk)."""
        return dict(self.frames)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> DecoderCache:
        """The inverse of ``tensors()``."""
        bad = [n for n, t in tensors.items() if not isinstance(t, torch.Tensor) or t.dim() != 5]
        if bad:
            raise ValueError(f"decoder cache tensors must be 5-D (B, C, T, h, w): {', '.join(bad)}")
        if len({t.shape[0] for t in tensors.values()}) > 1:
            raise ValueError("decoder cache tensors disagree on the batch size")
        return cls(tensors)

    @classmethod
    def stack(cls, caches: Sequence[DecoderCache]) -> DecoderCache:
        """One cache for the sessions of ``caches`` in that order (batch = concatenated batches)."""
        if not caches:
            raise ValueError("cannot stack an empty list of decoder caches")
        started = {c.started for c in caches}
        if started == {False}:
            return cls()
        if len(started) > 1:
            raise ValueError(
                "cannot stack a decoder cache that has not decoded its first chunk with one that has: "
                "the first chunk is decoded differently (it starts the video)"
            )
        names = caches[0].frames.keys()
        if any(c.frames.keys() != names for c in caches):
            raise ValueError("cannot stack decoder caches of different decoders")
        try:
            return cls({n: torch.cat([c.frames[n] for c in caches]) for n in names})
        except RuntimeError as exc:
            raise ValueError(f"cannot stack decoder caches of different shapes ({exc})") from None

    def split(self) -> list[DecoderCache]:
        """One cache per session, each owning its memory (the inverse of ``stack``)."""
        if not self.started:
            raise ValueError("a decoder cache that has not decoded its first chunk holds no sessions to split")
        if self.batch_size == 1:  # already its own
            return [self]
        return [
            DecoderCache({n: t[i : i + 1].clone() for n, t in self.frames.items()}) for i in range(self.batch_size)
        ]


# ----------------------------------------------------------------------------------------------
# Streaming forwards installed on the decoder's layers
# ----------------------------------------------------------------------------------------------


@dataclass
class _Session:
    """One ``decode_chunk`` call: the cache it reads, the frames it writes, and the upsampler convs
    whose next input starts with a placeholder frame."""

    cache: DecoderCache
    written: dict[str, torch.Tensor] = field(default_factory=dict)
    placeholders: set[str] = field(default_factory=set)

    def history(self, name: str, first_frame: torch.Tensor, context: int) -> torch.Tensor:
        """The ``context`` frames before this chunk's input to conv ``name``: the cached ones, or the
        first frame repeated at the start of the video (diffusers' causal padding)."""
        if not self.cache.started:
            return first_frame.expand(-1, -1, context, -1, -1)
        if name not in self.cache.frames:
            raise ValueError(f"decoder cache has no frames for {name}: it belongs to another decoder")
        return self.cache.frames[name]


_ACTIVE: ContextVar[_Session | None] = ContextVar("sana_wm_vae_decoder_session", default=None)


@contextmanager
def _streaming(cache: DecoderCache) -> Iterator[_Session]:
    session = _Session(cache)
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def _conv_forward(
    module: LTX2VideoCausalConv3d,
    name: str,
    diffusers_forward: Callable,
    hidden_states: torch.Tensor,
    causal: bool = True,
) -> torch.Tensor:
    """A causal conv whose left padding is the session's cached frames (diffusers' forward otherwise)."""
    session = _ACTIVE.get()
    if session is None:
        return diffusers_forward(hidden_states, causal=causal)
    skip = 1 if name in session.placeholders else 0
    session.placeholders.discard(name)
    frames = hidden_states[:, :, skip:]
    context = module.kernel_size[0] - 1
    conv = module.conv
    padded, (ph, pw) = _padded_input(session.history(name, frames[:, :, :1], context), frames, conv)
    session.written[name] = padded[:, :, -context:, ph : padded.shape[3] - ph, pw : padded.shape[4] - pw].clone()
    out = F.conv3d(padded, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
    if skip:
        out = torch.cat([out.new_zeros(*out.shape[:2], skip, *out.shape[3:]), out], dim=2)
    return out


STREAMING_PADDING = ("zeros", "reflect")  # the spatial padding modes _padded_input writes


def _padded_input(history: torch.Tensor, frames: torch.Tensor, conv: nn.Conv3d) -> tuple[torch.Tensor, tuple[int, int]]:
    """``cat([history, frames])`` over time with ``conv``'s spatial padding, written into one buffer.

    Equals ``conv``'s own padding of the concatenation; on CUDA, torch's reflection_pad3d kernel ran at a few
    per cent of memory bandwidth (122 ms of a 4-session step on an H100) and the concatenation was another copy.
    Returns the buffer and the (rows, columns) padded on each side.
    """
    _, ph, pw = conv.padding
    context, height, width = history.shape[2], frames.shape[3], frames.shape[4]
    layout = torch.channels_last_3d if frames.stride(1) == 1 < frames.shape[1] else torch.contiguous_format
    shape = (*frames.shape[:2], context + frames.shape[2], height + 2 * ph, width + 2 * pw)
    out = torch.empty(shape, dtype=frames.dtype, device=frames.device, memory_format=layout)
    rows, cols = slice(ph, ph + height), slice(pw, pw + width)
    out[:, :, :context, rows, cols] = history
    out[:, :, context:, rows, cols] = frames
    if conv.padding_mode == "zeros":
        out[..., :ph, :].zero_(), out[..., ph + height :, :].zero_()
        out[..., :pw].zero_(), out[..., pw + width :].zero_()
        return out, (ph, pw)
    for i in range(ph):  # reflect rows (without repeating the edge), then columns over the padded rows
        out[..., ph - 1 - i, cols] = out[..., ph + 1 + i, cols]
        out[..., ph + height + i, cols] = out[..., ph + height - 2 - i, cols]
    for j in range(pw):
        out[..., pw - 1 - j] = out[..., pw + 1 + j]
        out[..., pw + width + j] = out[..., pw + width - 2 - j]
    return out, (ph, pw)


def _upsampler_forward(
    conv_name: str, diffusers_forward: Callable, hidden_states: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """A temporal depth-to-space upsampler that keeps all output frames after the first chunk.

    Diffusers drops the first (s_t - 1) of the s_t frames made from input frame 0, i.e. from the
    start of the video. Later chunks get a placeholder frame in front (its conv output is zeros and
    its cache is untouched); of its s_t output frames diffusers drops s_t - 1, and we drop the last one.
    """
    session = _ACTIVE.get()
    if session is None or not session.cache.started:
        return diffusers_forward(hidden_states, causal=causal)
    session.placeholders.add(conv_name)
    widened = torch.cat([hidden_states[:, :, :1], hidden_states], dim=2)
    return diffusers_forward(widened, causal=causal)[:, :, 1:]


def _install_streaming(decoder: nn.Module, prefix: str = "decoder.") -> frozenset[str]:
    """Give the decoder's causal convs and temporal upsamplers their streaming forwards (instance
    attributes: the state dict is unchanged). Returns the names of the convs that keep a cache."""
    cached = set()
    for name, module in decoder.named_modules():
        full = prefix + name
        if isinstance(module, LTX2VideoCausalConv3d):
            if module.conv.stride[0] != 1 or module.conv.dilation[0] != 1:
                raise ValueError(f"{full}: streaming needs temporal stride and dilation 1")
            if module.conv.padding_mode not in STREAMING_PADDING or module.conv.padding[0] != 0:
                raise ValueError(f"{full}: streaming supports spatial padding {STREAMING_PADDING}, no temporal padding; "
                                 f"got {module.conv.padding_mode} {module.conv.padding}")
            if module.kernel_size[0] > 1:
                module.forward = partial(_conv_forward, module, full, module.forward)
                cached.add(full)
        elif isinstance(module, LTX2VideoUpsampler3d) and module.stride[0] > 1:
            module.forward = partial(_upsampler_forward, full + ".conv", module.forward)
    return frozenset(cached)


# ----------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------


def _check_supported(config: Mapping[str, Any]) -> None:
    """Refuse decoders whose output is not a deterministic function of the latents alone."""
    if config.get("timestep_conditioning"):
        raise ValueError("timestep-conditioned VAE decoders are not supported (streaming decodes without a timestep)")
    noise = config.get("decoder_inject_noise", False)
    if noise is True or (not isinstance(noise, bool) and any(noise)):
        raise ValueError("noise-injecting VAE decoders are not supported (their output is random)")


def _model_from_config(config: Mapping[str, Any]) -> AutoencoderKLLTX2Video:
    """The diffusers VAE for ``config`` (constructor keys), with a causal decoder."""
    unknown = sorted(set(config) - _INIT_KEYS)
    if unknown:
        raise ValueError(f"unknown AutoencoderKLLTX2Video config keys: {', '.join(unknown)}")
    _check_supported(config)
    return AutoencoderKLLTX2Video(**{**config, "decoder_causal": True})


def _read_config(folder: Path) -> dict[str, Any]:
    """Constructor keys from a VAE folder's ``config.json`` (diffusers' or NVlabs' causal class)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a diffusers VAE folder)")
    raw = read_json_object(path)
    class_name = raw.get("_class_name", "AutoencoderKLLTX2Video")
    if class_name not in _CLASS_NAMES:
        raise CheckpointError(f"{path}: a {class_name}, not an LTX-2 video VAE")
    config = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _TRAINING_ONLY_KEYS}
    # NVlabs' causal class names the decoder's upsample pattern differently; None means all spatiotemporal.
    upsample = config.pop("decoder_upsample_type", None)
    if upsample is not None:
        config["upsample_type"] = upsample
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as exc:  # truncated or corrupt files
            raise CheckpointError(f"{f}: cannot read weights ({type(exc).__name__}: {exc})") from None
    return out


def _move(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> None:
    # nn.Module.to, not ModelMixin.to: the latter warns about float32-pinned modules this VAE has none of.
    nn.Module.to(model, device=device, dtype=dtype)


def _randomise_statistics(model: AutoencoderKLLTX2Video) -> None:
    """Non-trivial latent statistics for random models, so normalisation bugs show in tests."""
    model.latents_mean.normal_(0.0, 0.5)
    model.latents_std.uniform_(0.5, 2.0)


# ----------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------


class VideoVAE:
    """The LTX-2 video VAE: deterministic image encoding, one-shot and streaming causal decoding.

    Latents here are always the model-space ones: (z - latents_mean) * scaling_factor / latents_std.
    """

    def __init__(self, model: AutoencoderKLLTX2Video) -> None:
        _check_supported(model.config)
        model.decoder.is_causal = True
        self.model = model.eval().requires_grad_(False)
        self._cached_convs = _install_streaming(model.decoder)
        self.spatial_ratio, self.temporal_ratio = _decoder_ratios(model.decoder)

    @classmethod
    def from_preset(
        cls, name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> VideoVAE:
        """A randomly initialised VAE of preset ``name``; the same ``seed`` gives the same weights on
        any device (they are drawn on the CPU). ``device="meta"`` builds it without memory."""
        config = vae_config(name)
        if torch.device(device).type == "meta":
            with torch.device("meta"):
                model = _model_from_config(config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = _model_from_config(config)
                _randomise_statistics(model)
        _move(model, device, dtype)
        return cls(model)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> VideoVAE:
        """Load a local diffusers VAE folder (``config.json`` + ``*.safetensors``, e.g. the release's
        ``ltx2_causal_vae/`` or ``vae/``) strictly; nothing is downloaded. ``dtype`` defaults to the
        stored one."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder")
        config = _read_config(folder)
        state_dict = _read_weights(folder)
        try:
            with torch.device("meta"):
                model = _model_from_config(config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{folder / 'config.json'}: {exc}") from None
        check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict, str(folder))
        model.load_state_dict(state_dict, strict=True, assign=True)
        stored = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        _move(model, device, dtype or (stored.pop() if len(stored) == 1 else torch.float32))
        return cls(model)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.latents_mean.dtype

    @property
    def device(self) -> torch.device:
        return self.model.latents_mean.device

    # -- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised float32 latent ``(B, C, 1, H/32, W/32)`` of an image (the posterior mode).

        ``rgb``: uint8 array ``(H, W, 3)`` or ``(B, H, W, 3)``, or a float tensor ``(B, 3, H, W)`` in
        [-1, 1]; H and W must be multiples of the spatial compression (32).
        """
        pixels = self._pixels(rgb).to(device=self.device, dtype=self.dtype)
        z = self.model.encode(pixels.unsqueeze(2), causal=True).latent_dist.mode()
        return self.normalise(z)

    def _pixels(self, rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``rgb`` as a float ``(B, 3, H, W)`` tensor in [-1, 1], after checking its layout."""
        expected = "a uint8 array (H, W, 3) or (B, H, W, 3), or a float tensor (B, 3, H, W) in [-1, 1]"
        if isinstance(rgb, np.ndarray):
            if rgb.dtype != np.uint8 or rgb.ndim not in (3, 4) or rgb.shape[-1] != 3:
                raise ValueError(f"encode_image expects {expected}; got a {rgb.dtype} array of shape {rgb.shape}")
            batch = rgb[None] if rgb.ndim == 3 else rgb
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        elif isinstance(rgb, torch.Tensor):
            if not rgb.is_floating_point() or rgb.dim() != 4 or rgb.shape[1] != 3:
                got = f"a {rgb.dtype} tensor of shape {tuple(rgb.shape)}"
                raise ValueError(f"encode_image expects {expected}; got {got}")
            pixels = rgb
        else:
            raise ValueError(f"encode_image expects {expected}; got {type(rgb).__name__}")
        height, width = pixels.shape[-2:]
        if height % self.spatial_ratio or width % self.spatial_ratio:
            raise ValueError(
                f"encode_image: image size {height}x{width} is not a multiple of {self.spatial_ratio} "
                "(the VAE's spatial compression); resize it to the VAE resolution first"
            )
        return pixels

    # -- decoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot causal decode (diffusers' own forward): normalised ``(B, C, T, h, w)`` -> video
        ``(B, 3, 8(T-1)+1, 32h, 32w)`` in [-1, 1], in the VAE's dtype."""
        z = self._denormalise(self._checked(latents))
        return self.model.decoder(z, causal=True).clamp_(-1.0, 1.0)

    def new_decoder_cache(self) -> DecoderCache:
        """An empty cache: its first chunk must start at latent frame 0."""
        return DecoderCache()

    @torch.no_grad()
    def decode_chunk(self, latents_chunk: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Decode the next ``T`` latent frames of the sessions in ``cache`` (updated in place).

        Returns ``1 + 8(T-1)`` frames for the first chunk and ``8T`` afterwards; the concatenated
        outputs equal ``decode`` of the concatenated latents.
        """
        z = self._denormalise(self._checked(latents_chunk, cache))
        with _streaming(cache) as session:
            video = self.model.decoder(z, causal=True)
        if session.written.keys() != self._cached_convs:  # every cached conv must have run once
            raise RuntimeError("streaming decode did not pass through every causal conv of the decoder")
        cache.frames = session.written
        return video.clamp_(-1.0, 1.0)

    def _checked(self, latents: torch.Tensor, cache: DecoderCache | None = None) -> torch.Tensor:
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels or latents.shape[2] < 1:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, T>=1, h, w); got shape {tuple(latents.shape)}"
            )
        if cache is not None and cache.started:
            if cache.frames.keys() != self._cached_convs:
                raise ValueError("this decoder cache belongs to a different decoder")
            grid = cache.frames["decoder.conv_in"].shape
            if grid[0] != latents.shape[0] or grid[-2:] != latents.shape[-2:]:
                raise ValueError(
                    f"decoder cache is for {grid[0]} session(s) of {grid[-2]}x{grid[-1]} latents; "
                    f"got {latents.shape[0]} of {latents.shape[-2]}x{latents.shape[-1]}"
                )
        return latents

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        shape = (1, -1, 1, 1, 1)
        mean = self.model.latents_mean.float().view(shape)
        std = self.model.latents_std.float().view(shape)
        return mean, std, float(self.model.config.scaling_factor)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents -> the model's latents: (z - latents_mean) * scaling_factor / latents_std."""
        mean, std, scale = self._stats()
        return (z.float() - mean) * scale / std

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std, scale = self._stats()
        return (latents.to(self.device).float() * std / scale + mean).to(self.dtype)

    @staticmethod
    def to_uint8(video: torch.Tensor) -> np.ndarray:
        """``(B, 3, F, H, W)`` video in [-1, 1] -> uint8 array ``(B, F, H, W, 3)``."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video (B, 3, F, H, W); got shape {tuple(video.shape)}")
        pixels = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 4, 1).contiguous()  # channels last on the device
        if pixels.device.type != "cuda":
            return pixels.cpu().numpy()
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)  # pageable copies crawl (~1 GB/s)
        host.copy_(pixels, non_blocking=True)
        torch.cuda.current_stream(pixels.device).synchronize()
        return host.numpy()


def _decoder_ratios(decoder: nn.Module) -> tuple[int, int]:
    """(spatial, temporal) compression, read off the decoder's upsamplers and unpatchify."""
    spatial, temporal = decoder.patch_size, decoder.patch_size_t
    for module in decoder.modules():
        if isinstance(module, LTX2VideoUpsampler3d):
            temporal *= module.stride[0]
            spatial *= module.stride[1]
    return spatial, temporal
