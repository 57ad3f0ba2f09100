"""The Stage-2 refiner: chunk-autoregressive SDEdit of Stage-1 latents with the LTX-2 video DiT (sana-wm.md F).

The network is diffusers' ``SanaWMLTX2RefinerTransformer3DModel`` with its ``SanaWMRefinerKVCache``; this module
owns the driver loop, written from the recipe of section F:

1. The sink is latent frame 0, raw (never refined, emitted as is). One sigma=0 forward captures its K/V pre-RoPE.
2. The other frames go in blocks of 3. Each block starts from x = (1 - s0) z + s0 eps (s0 = 0.909375, one eps per
   block, drawn in order from one seeded CPU generator) and takes 3 distilled Euler steps s = (0.909375, 0.725,
   0.421875) -> 0; the model predicts v, x0 = x - s v. Its queries attend to [sink, history, block].
3. One more sigma=0 forward of the refined block captures its post-RoPE K/V, appended to the history, which is
   trimmed to its last 10 frames. The window is therefore at most 1 + 10 + 3 = 14 frames.
4. Before each block the sink's RoPE is rebuilt at position (block start - history frames - 1), so the sink slides to
   sit just before the history; every other frame keeps its absolute position. fps (16) scales RoPE time.

Only the video stream of the audio-video checkpoint runs, so the audio weights (5.8 B of 18.9 B parameters in the
release) are checked by name and shape but never loaded.

Prompt paths: the release encodes with Gemma-3-12B (1024 tokens, left-padded, all hidden states) followed by
``LTX2TextConnectors``; both are loaded for the encoding and freed right after it. The ``tiny`` preset bypasses
Gemma-3 and the connectors: a ``HashTextEncoder`` of the DiT's ``caption_channels`` gives its prompt features.
Diffusers' ``SanaWMLTX2Refiner`` normalises the stacked Gemma states itself and the connectors normalise them again;
that second masked mean/range normalisation is the identity up to its eps, so here the connectors do it once, as in
diffusers' LTX-2 pipeline.

Resuming: the state of a refinement is a function of the refined frames so far. ``refine_blocks(start_frame=k,
refined_prefix=...)`` rebuilds the window by replaying the sigma=0 capture forward of every finished block (one
forward per block instead of four) and continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import bisect
import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from diffusers.models.transformers.transformer_sana_wm_refiner import (
    SanaWMLTX2RefinerTransformer3DModel,
    SanaWMRefinerKVCache,
)
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
from torch import nn

from .checkpoint import CheckpointError, _first_line, check_state_dict, read_json_object
from .schedule import euler_step
from .text import HashTextEncoder, TextEncoder

__all__ = [
    "PromptSchedule",
    "REFINER_PRESETS",
    "RefineRecipe",
    "Refiner",
    "GemmaConnectorEncoder",
    "refiner_transformer",
    "refiner_state_bytes",
]

# Constructor arguments of ``SanaWMLTX2RefinerTransformer3DModel``. "ltx2" is the release geometry, i.e. diffusers'
# defaults (48 layers, 32 x 128 heads, caption_channels 3840): 18.88 B parameters, 13.04 B of them video.
REFINER_PRESETS: dict[str, dict[str, Any]] = {
    "ltx2": {},
    "tiny": {
        "in_channels": 16,  # the tiny VAE's latent channels
        "out_channels": 16,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "cross_attention_dim": 32,
        "num_layers": 2,
        "caption_channels": 24,  # HashTextEncoder's default width
        "audio_in_channels": 8,
        "audio_out_channels": 8,
        "audio_num_attention_heads": 2,
        "audio_attention_head_dim": 8,
        "audio_cross_attention_dim": 16,
    },
}
TINY_PROMPT_TOKENS = 32  # max_length of the tiny preset's HashTextEncoder

# Attribute names (matched at their start) of the submodules and parameters that only the audio stream and the
# audio-video cross-attention read.
_UNUSED_BY_VIDEO = re.compile(r"audio_|av_cross_attn_|video_to_audio_|video_a2v_|prompt_adaln|prompt_scale_shift_table")
_TRANSFORMER_CLASSES = frozenset({"SanaWMLTX2RefinerTransformer3DModel", "LTX2VideoTransformer3DModel"})
_GEMMA_TOKENS = 1024  # tokens per prompt of the release's text path (left-padded)
_PROMPTS_PER_ENCODE = 8  # distinct prompts of a schedule per text-encoder call (bounds Gemma-3's activations)

# A session's prompts: (first latent frame, prompt) pairs, from frame 0 on, frames increasing.
PromptSchedule = Sequence[tuple[int, str]]


@dataclass(frozen=True)
class RefineRecipe:
    """The chunk-autoregressive refinement the release was trained for (sana-wm.md F)."""

    sigmas: tuple[float, ...] = (0.909375, 0.725, 0.421875)  # distilled Euler steps, then 0; sigmas[0] is SDEdit's
    block_frames: int = 3  # latent frames refined together
    history_frames: int = 10  # refined frames kept in the window (kv_max_frames 11 - 1 sink frame)
    fps: float = 16.0  # frame rate of the video; scales RoPE time


def refiner_transformer(name: str, seed: int = 0, device: str | torch.device = "cpu") -> SanaWMLTX2RefinerTransformer3DModel:
    """The whole audio-video DiT of preset ``name``, randomly initialised from ``seed`` (drawn on the CPU, so the same
    on any device) in fp32; ``device="meta"`` builds it without memory."""
    if name not in REFINER_PRESETS:
        raise ValueError(f"unknown refiner preset {name!r} (known: {', '.join(REFINER_PRESETS)})")
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return SanaWMLTX2RefinerTransformer3DModel(**REFINER_PRESETS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SanaWMLTX2RefinerTransformer3DModel(**REFINER_PRESETS[name])
    return model.to(device)


def random_on_device(meta_model: SanaWMLTX2RefinerTransformer3DModel, seed: int, dtype: torch.dtype,
                     device: str | torch.device) -> SanaWMLTX2RefinerTransformer3DModel:
    """``meta_model``'s video stream with every weight drawn from N(0, 0.02) on ``device`` in ``dtype``: the
    release-size model starts in seconds (built on the CPU in fp32 it takes 75 GB and minutes)."""
    model = nn.Module.to(video_only(meta_model), dtype).to_empty(device=device)
    if torch.device(device).type == "meta":
        return model
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model


def refiner_state_bytes(
    config: Mapping[str, Any],
    latent_hw: tuple[int, int],
    dtype: torch.dtype = torch.bfloat16,
    recipe: RefineRecipe = RefineRecipe(),
) -> int:
    """Bytes of the K/V a refinement keeps between blocks: every layer's K and V of the sink and the history frames
    (the active block's own K/V only exist during its forwards). ``config``: the DiT's config (``model.config``)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    tokens_per_frame = (latent_hw[0] // config["patch_size"]) * (latent_hw[1] // config["patch_size"])
    frames = 1 + recipe.history_frames
    element = torch.empty(0, dtype=dtype).element_size()
    return config["num_layers"] * frames * tokens_per_frame * width * 2 * element


# ----------------------------------------------------------------------------------------------
# The refiner
# ----------------------------------------------------------------------------------------------


class Refiner:
    """Stage-1 latents + prompt -> refined latents, block by block (see the module docstring)."""

    def __init__(
        self,
        transformer: SanaWMLTX2RefinerTransformer3DModel,
        text_encoder: TextEncoder,
        recipe: RefineRecipe = RefineRecipe(),
    ) -> None:
        config = transformer.config
        if config.patch_size != 1 or config.patch_size_t != 1:
            raise ValueError(f"the refiner expects patch sizes 1 (LTX-2); got {config.patch_size}x{config.patch_size_t}")
        if text_encoder.caption_channels != config.caption_channels:
            raise ValueError(
                f"the text encoder gives {text_encoder.caption_channels}-d features "
                f"but the DiT expects {config.caption_channels}"
            )
        self.transformer = video_only(transformer).eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.recipe = recipe

    @classmethod
    def from_preset(
        cls, name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Refiner:
        """A randomly initialised refiner of preset ``name``; the prompt path is a ``HashTextEncoder`` (no Gemma-3,
        no connectors) of the preset's ``caption_channels``. On the CPU the weights are the model's own
        initialisation from ``seed``; on another device they are drawn there (:func:`random_on_device`)."""
        if torch.device(device).type == "cpu":
            transformer = refiner_transformer(name, seed, device)
            # nn.Module.to, not ModelMixin.to: the latter warns about float32-pinned modules this DiT has none of.
            nn.Module.to(transformer, dtype=dtype)
        else:
            transformer = random_on_device(refiner_transformer(name, device="meta"), seed, dtype, device)
        channels = transformer.config.caption_channels
        return cls(transformer, HashTextEncoder(channels, TINY_PROMPT_TOKENS, seed=seed, device=device, dtype=dtype))

    @classmethod
    def from_pretrained(
        cls,
        transformer_dir: str | Path,
        connectors_dir: str | Path,
        text_encoder_dir: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> Refiner:
        """Load the release layout (``refiner_diffusers/transformer``, ``refiner_diffusers/connectors``, ``gemma3_12b``)
        from local files. The DiT's and the connectors' keys and shapes are checked strictly (``CheckpointError``
        names the key); the DiT's video weights are loaded now, the connectors and Gemma-3 at each prompt encoding."""
        transformer = _ModelFolder.checked(transformer_dir, SanaWMLTX2RefinerTransformer3DModel, _TRANSFORMER_CLASSES)
        connectors = _ModelFolder.checked(connectors_dir, LTX2TextConnectors, frozenset({"LTX2TextConnectors"}))
        encoder = GemmaConnectorEncoder(Path(text_encoder_dir), connectors, dtype=dtype, device=device)
        return cls(transformer.load(dtype, device, prune=video_only), encoder)

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_in.weight.dtype

    # -- refinement ----------------------------------------------------------------------------

    def refine(self, latents: torch.Tensor, prompt: str | PromptSchedule, seed: int = 0) -> torch.Tensor:
        """All refined latents ``(1, C, T, h, w)`` at once (the concatenated blocks of ``refine_blocks``)."""
        return torch.cat(list(self.refine_blocks(latents, prompt, seed=seed)), dim=2)

    @torch.no_grad()
    def refine_blocks(
        self,
        latents: torch.Tensor,
        prompt: str | PromptSchedule,
        *,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
        start_frame: int = 0,
        refined_prefix: torch.Tensor | None = None,
        pace: Callable[[], None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Refine normalised Stage-1 latents ``(1, C, T, h, w)``, yielding blocks ``(1, C, t, h, w)`` in order: frame 0
        as is, then blocks of up to 3 refined frames, in the input's dtype. ``progress(done, T)`` follows each block.

        ``prompt`` is one prompt for the whole video, or a schedule ``[(first_latent_frame, prompt), ...]`` starting at
        frame 0 with increasing frames (a session whose prompt changed). A block is conditioned on the prompt in effect
        at its first latent frame, and so is its capture into the history; the sink is captured with the prompt of
        frame 0. A schedule of one prompt is the same run as that prompt alone.

        Resume an interrupted run with ``start_frame=k`` (a ``done`` value its ``progress`` reported) and
        ``refined_prefix``: the first k frames it yielded. The blocks from k on equal the uninterrupted run's.

        ``pace()``, when given, is called before every DiT forward (four per block: three denoising steps and the
        history capture), so that a caller sharing the device can wait for a gap before each one.
        """
        total = self._check_latents(latents)
        schedule = _check_schedule(prompt)
        prefix = self._check_resume(latents, start_frame, refined_prefix)
        if start_frame == 0:
            yield latents[:, :, :1].clone()
            _report(progress, 1, total)
        if max(start_frame, 1) == total:
            return
        z = latents.to(self.device, self.dtype)
        contexts = self._encode_schedule(schedule, total)  # each prompt the video uses, encoded once
        window = _Window(self, z.shape[-2:], contexts[_prompt_at(schedule, 0)], pace)
        window.capture_sink(z[:, :, :1])
        noise = torch.Generator().manual_seed(seed)
        for start in range(1, total, self.recipe.block_frames):
            end = min(start + self.recipe.block_frames, total)
            eps = torch.randn(z[:, :, start:end].shape, generator=noise)  # drawn for replayed blocks too: same stream
            window.context = contexts[_prompt_at(schedule, start)]
            if end <= start_frame:
                window.replay(prefix[:, :, start:end], start)
                continue
            block = window.refine(z[:, :, start:end], eps.to(self.device), start)
            yield block.to(latents.dtype)
            _report(progress, end, total)

    def transformer_inputs(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt features ``(1, L, caption_channels)`` in the DiT's dtype and their 0/1 mask ``(1, L)``."""
        features, mask = self.text_encoder.encode([prompt])
        return features.to(self.device, self.dtype), mask.to(self.device, self.dtype)

    def _encode_schedule(self, schedule: list[tuple[int, str]], total: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``transformer_inputs`` of every distinct prompt in effect at frame 0 or at a block start before ``total``,
        encoded ``_PROMPTS_PER_ENCODE`` at a time (the release's encoder loads Gemma-3 once per ``encode`` call)."""
        starts = [0, *range(1, total, self.recipe.block_frames)]
        prompts = list(dict.fromkeys(_prompt_at(schedule, frame) for frame in starts))
        contexts = {}
        for i in range(0, len(prompts), _PROMPTS_PER_ENCODE):
            batch = prompts[i : i + _PROMPTS_PER_ENCODE]
            features, mask = self.text_encoder.encode(batch)
            for row, text in enumerate(batch):  # (1, L, D) and (1, L) per prompt
                contexts[text] = features[row : row + 1].to(self.device, self.dtype), mask[row : row + 1].to(self.device, self.dtype)
        return contexts

    def _check_latents(self, latents: torch.Tensor) -> int:
        channels = self.transformer.config.in_channels
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != channels or latents.shape[2] < 1:
            raise ValueError(f"refine expects normalised latents (1, {channels}, T>=1, h, w); got shape {tuple(latents.shape)}")
        return int(latents.shape[2])

    def _check_resume(self, latents: torch.Tensor, start_frame: int, refined_prefix: torch.Tensor | None) -> torch.Tensor | None:
        """The refined prefix on the DiT's device and dtype, after checking it fits ``start_frame``."""
        total, step = latents.shape[2], self.recipe.block_frames
        if start_frame == 0:
            if refined_prefix is not None:
                raise ValueError("refined_prefix is only for resuming (start_frame > 0)")
            return None
        if start_frame < 0 or start_frame > total or (start_frame != total and (start_frame - 1) % step):
            raise ValueError(f"start_frame must be 0, T={total} or 1 + {step}k (a block boundary); got {start_frame}")
        expected = (*latents.shape[:2], start_frame, *latents.shape[3:])
        if refined_prefix is None or tuple(refined_prefix.shape) != expected:
            got = None if refined_prefix is None else tuple(refined_prefix.shape)
            raise ValueError(f"resuming at frame {start_frame} needs refined_prefix of shape {expected}; got {got}")
        return refined_prefix.to(self.device, self.dtype)


def _check_schedule(prompt: str | PromptSchedule) -> list[tuple[int, str]]:
    """``prompt`` as a schedule ``[(first_latent_frame, prompt)]``, after checking that it starts at frame 0 and that
    its frames increase."""
    if isinstance(prompt, str):
        return [(0, prompt)]
    try:
        schedule = [(frame, text) for frame, text in prompt]
    except (TypeError, ValueError):
        raise ValueError(f"prompt must be a str or a sequence of (first_latent_frame, prompt) pairs; got {prompt!r}") from None
    if not schedule or any(type(f) is not int or not isinstance(t, str) for f, t in schedule):
        raise ValueError(f"a prompt schedule is a non-empty sequence of (int, str) pairs; got {schedule!r}")
    frames = [frame for frame, _ in schedule]
    if frames[0] != 0 or any(b <= a for a, b in zip(frames, frames[1:])):
        raise ValueError(f"a prompt schedule must start at latent frame 0 with increasing frames; got frames {frames}")
    return schedule


def _prompt_at(schedule: list[tuple[int, str]], frame: int) -> str:
    """The prompt in effect at latent ``frame``: that of the last entry starting at or before it."""
    return schedule[bisect.bisect_right([f for f, _ in schedule], frame) - 1][1]


def _report(progress: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


class _Window:
    """The attention window of one refinement: the DiT's per-layer KV cache (``kv_cache.get(i)``: sink K/V pre-RoPE
    and history K/V post-RoPE, each ``(1, frames * tokens_per_frame, heads * head_dim)``) and ``history_frames``,
    the number of refined frames the history holds (at most ``recipe.history_frames``). ``context`` is the prompt
    (features, mask) of the forwards to come; the driver sets it before each block. ``pace`` runs before each forward."""

    def __init__(self, refiner: Refiner, latent_hw: tuple[int, int], context: tuple[torch.Tensor, torch.Tensor],
                 pace: Callable[[], None] | None = None) -> None:
        self.model = refiner.transformer
        self.pace = pace
        self.recipe = refiner.recipe
        self.height, self.width = int(latent_hw[0]), int(latent_hw[1])
        self.context = context
        self.kv_cache = SanaWMRefinerKVCache(len(self.model.transformer_blocks))
        self.history_frames = 0

    @property
    def layers(self) -> list:
        return self.kv_cache.layer_caches

    def capture_sink(self, frame0: torch.Tensor) -> None:
        """Step 1: the raw frame 0 at sigma=0, no prefix; keep its pre-RoPE K/V as the sink."""
        self._forward(frame0, 0, 0.0, "capture_pre_rope")
        for layer in self.layers:
            layer.store_sink(*layer.get_captured_pre_rope())

    def refine(self, clean: torch.Tensor, eps: torch.Tensor, start: int) -> torch.Tensor:
        """Steps 2-4 for the block of frames [start, start + t): SDEdit start, Euler steps, capture, advance."""
        sigmas = (*self.recipe.sigmas, 0.0)
        self._slide_sink(start)
        x = ((1.0 - sigmas[0]) * clean.float() + sigmas[0] * eps.float()).to(clean.dtype)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            velocity = self._forward(x, start, sigma, "inject")
            x = euler_step(x, velocity, sigma, sigma_next)
        self._append(x, start)
        return x

    def replay(self, refined: torch.Tensor, start: int) -> None:
        """Rebuild the window after an already refined block, as ``refine`` left it."""
        self._slide_sink(start)
        self._append(refined, start)

    def _slide_sink(self, start: int) -> None:
        """Step 4: put the sink's RoPE just before the history (the frame before its first frame)."""
        self.kv_cache.sink_pe = self._rope(start - self.history_frames - 1, 1)

    def _append(self, refined: torch.Tensor, start: int) -> None:
        """Step 3: capture the refined block's post-RoPE K/V under the current prefix, append, trim the history."""
        self._forward(refined, start, 0.0, "inject_and_capture_post_rope")
        self.history_frames = min(self.history_frames + refined.shape[2], self.recipe.history_frames)
        keep = self.history_frames * self.height * self.width
        for layer in self.layers:
            key, value = layer.get_captured_post_rope()
            history = layer.get_history()
            if history is not None:
                key, value = torch.cat([history[0], key], dim=1), torch.cat([history[1], value], dim=1)
            if key.shape[1] > keep:  # copies, so that the trimmed frames' memory is freed
                key, value = key[:, -keep:].clone(), value[:, -keep:].clone()
            layer.store_history(key, value)

    def _rope(self, first: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) of ``frames`` latent frames from absolute index ``first``."""
        positions = list(range(first, first + frames))
        device = self.model.proj_in.weight.device
        model, fps = self.model, self.recipe.fps
        return model.build_rotary_emb_for_absolute_positions(1, positions, self.height, self.width, device, fps)

    def _forward(self, x: torch.Tensor, start: int, sigma: float, mode: str) -> torch.Tensor:
        """The DiT's velocity for the block ``x`` ``(1, C, t, h, w)`` at noise level ``sigma``."""
        if self.pace is not None:
            self.pace()
        _, channels, frames, height, width = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(1, frames * height * width, channels)  # (1, t*h*w, C)
        # One timestep for all tokens (broadcast over them): the same embedding as a per-token one, computed once.
        timestep = torch.full((1, 1), sigma * self.model.config.timestep_scale_multiplier, device=x.device)
        features, mask = self.context
        out = self.model(
            hidden_states=tokens,
            encoder_hidden_states=features,
            timestep=timestep,
            video_rotary_emb=self._rope(start, frames),
            encoder_attention_mask=mask,
            kv_cache=self.kv_cache,
            kv_cache_mode=mode,
            return_dict=False,
        )[0]
        return out.reshape(1, frames, height, width, -1).permute(0, 4, 1, 2, 3)  # (1, C, t, h, w)


# ----------------------------------------------------------------------------------------------
# Loading the release
# ----------------------------------------------------------------------------------------------


def video_only(model: SanaWMLTX2RefinerTransformer3DModel) -> SanaWMLTX2RefinerTransformer3DModel:
    """Remove, in place, the submodules and parameters that only the audio stream reads (the video forward never
    touches them), so they take no memory."""
    unused = [
        (module, name)
        for module in model.modules()
        for name in [*module._modules, *module._parameters]
        if _UNUSED_BY_VIDEO.match(name)
    ]
    for module, name in unused:
        delattr(module, name)
    return model


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name} (expected a diffusers model folder)")
    return read_json_object(path)


@dataclass(frozen=True)
class _ModelFolder:
    """A diffusers model folder whose keys and shapes were checked against its class (``checked``): what is needed
    to build the model and to read its tensors later."""

    folder: Path
    model_class: type
    config: dict[str, Any]  # constructor keys from config.json
    files: dict[str, Path]  # tensor name -> the safetensors file holding it

    @classmethod
    def checked(cls, folder: str | Path, model_class: type, class_names: frozenset[str]) -> _ModelFolder:
        """Read ``config.json`` and the safetensors headers (no tensor data) and check every key strictly."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder")
        raw = _read_json(folder / "config.json")
        class_name = raw.get("_class_name", model_class.__name__)
        if class_name not in class_names:
            raise CheckpointError(f"{folder / 'config.json'}: a {class_name}, not a {model_class.__name__}")
        spec = cls(folder, model_class, {k: v for k, v in raw.items() if not k.startswith("_")}, {})
        model = spec.meta_model()
        shapes, files = _headers(folder)
        check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, str(folder))
        return cls(folder, model_class, spec.config, files)

    def meta_model(self) -> nn.Module:
        try:
            with torch.device("meta"):
                return self.model_class(**self.config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.folder / 'config.json'}: {exc}") from None

    def load(
        self, dtype: torch.dtype, device: str | torch.device, prune: Callable[[nn.Module], nn.Module] = lambda m: m
    ) -> nn.Module:
        """The model, less what ``prune`` removes, with its tensors read from the files (and no others)."""
        from safetensors import safe_open

        model = prune(self.meta_model())
        wanted = model.state_dict().keys()
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted(set(self.files.values())):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors.update({k: f.get_tensor(k).to(dtype) for k in f.keys() if k in wanted})
        model.load_state_dict(tensors, strict=True, assign=True)
        return model.to(device).eval().requires_grad_(False)


class _Shape:
    """A tensor's shape, as ``check_state_dict`` reads it, without its data."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)


def _headers(folder: Path) -> tuple[dict[str, _Shape], dict[str, Path]]:
    """Shapes and files of every tensor in the folder's ``*.safetensors`` (read from the headers only)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    shapes: dict[str, _Shape] = {}
    where: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    shapes[key], where[key] = _Shape(f.get_slice(key).get_shape()), path
        except Exception as exc:  # truncated or corrupt files
            raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    return shapes, where


class GemmaConnectorEncoder:
    """The release's prompt path: Gemma-3 hidden states of the left-padded prompt (all layers, stacked), then
    ``LTX2TextConnectors`` -> ``(B, 1024, 3840)`` features and a bool mask.

    Gemma-3-12B (24 GB in bf16) and the connectors are loaded for each ``encode`` and freed after it: a refinement
    encodes its prompts once, up front (a batch of up to 8 per load), and the memory is the DiT's for the rest of the job.
    """

    max_length = _GEMMA_TOKENS

    def __init__(self, folder: Path, connectors: _ModelFolder, *, dtype: torch.dtype, device: str | torch.device) -> None:
        if not (folder / "config.json").is_file() and not (folder / "text_encoder").is_dir():
            raise CheckpointError(f"{folder}: not a Gemma-3 folder (no config.json, no text_encoder/)")
        self.folder = folder
        self.connectors = connectors
        self.caption_channels = int(connectors.meta_model().config.caption_channels)
        self.dtype, self.device = dtype, torch.device(device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, 1024, caption_channels)`` and a bool mask ``(B, 1024)`` of ``prompts``."""
        states, mask = self._gemma_states(prompts)
        model = self.connectors.load(self.dtype, self.device)
        features, _, video_mask = model(states.flatten(2, 3), mask, padding_side="left")
        del model
        _free(self.device)
        return features, video_mask.bool()

    def _gemma_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """All Gemma-3 hidden states ``(B, 1024, hidden, layers + 1)`` and the 0/1 mask ``(B, 1024)``; the model is
        loaded here and freed before returning."""
        tokenizer, model = _load_gemma(self.folder, self.dtype, self.device)
        tokens = tokenizer(
            [p.strip() for p in prompts],
            padding="max_length",
            padding_side="left",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        # Only the hidden states are used; logits_to_keep=1 skips the 262k-word head over all 1024 tokens.
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        states = torch.stack(out.hidden_states, dim=-1)  # (B, 1024, hidden, layers + 1)
        del out
        del model
        _free(self.device)
        return states, mask


def _load_gemma(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, nn.Module]:
    """Tokenizer and ``Gemma3ForConditionalGeneration`` from a local folder (or its ``tokenizer/`` and
    ``text_encoder/``), refusing missing, unexpected or mis-shaped weights."""
    model_dir = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
    tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    try:
        from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model, info = Gemma3ForConditionalGeneration.from_pretrained(
            model_dir, local_files_only=True, dtype=dtype, output_loading_info=True
        )
    except Exception as exc:  # missing files, bad configs, corrupt weights, ...
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        raise CheckpointError(f"{folder}: cannot load the Gemma-3 text encoder ({reason})") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise CheckpointError(f"{model_dir}: {kind.replace('_', ' ')}: {', '.join(keys[:4])}")
    return tokenizer, model.to(device).eval()


def _free(device: torch.device) -> None:
    """Return freed memory to the device (the caller dropped its last reference first)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
