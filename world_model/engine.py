"""The batched streaming engine: one object owns the model and advances many sessions per step.

Each session owns its recurrent DiT state, its causal-VAE decoder cache, its noise generator, prompt and
chunk counter. ``step`` groups the requested sessions by chunk kind - first (4 latents with the image
anchor, empty state), second (softmax window holds only the sink) and later (sink + previous chunk) - and
runs each group as one batch: every forward of the self-forcing sampler and the VAE decode see all of the
group's sessions at once, each at its own RoPE position. Everything outside this module sees numpy arrays
and ids only (``engine_api``).

Long sessions: RoPE time positions are re-based (``SanaWMTransformer.rebase_state``) before they leave the
1024-frame table, which leaves the output unchanged, so a session can run for hours at constant memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .camera import VAE_SPATIAL_STRIDE, VAE_TIME_STRIDE, CameraInputs, chunk_camera_inputs
from .checkpoint import CheckpointError, load_transformer
from .config import preset
from .controls import CameraRig, intrinsics_for
from .engine_api import ChunkRequest, ChunkResult, EngineError, EngineInfo
from .sampler import Denoiser, SamplerConfig, denoise_chunk, write_chunk
from .schedule import STREAMING_TIMESTEPS
from .state import SessionState, safetensors_metadata
from .quantize import quantize_fp8
from .text import HASH_ENCODER_NAME, HashTextEncoder, PromptCache, TextEncoder, text_encoder_for
from .transformer import SanaWMTransformer
from .vae import DecoderCache, VideoVAE

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}  # fp8: bf16 + FP8 block linears
MIN_IMAGE_SIDE = 16
MAX_PROMPT_CHARS = 2000

# Pixel size of each built-in preset (multiples of 32: the VAE's spatial stride).
DEFAULT_SIZE = {"tiny": (256, 128), "demo": (256, 160), "sana-wm-streaming": (1280, 704), "sana-wm-bidirectional": (1280, 704)}
# The VAE geometry each DiT preset pairs with.
VAE_FOR = {"tiny": "tiny", "demo": "demo", "sana-wm-streaming": "ltx2", "sana-wm-bidirectional": "ltx2"}
# Caption width of the small presets, which read hash-text features (Gemma gives 2304).
HASH_CAPTION_CHANNELS = 24
# Presets whose trained weights ship inside the package (``transformer/`` and ``vae/`` diffusers folders,
# as ``world_model.training.train_dit --export`` writes them); the other presets only have random weights.
SHIPPED_WEIGHTS = {"demo": Path(__file__).resolve().parent / "demo"}
_SHIPPED_FILES = ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "demo"  # a preset name; with ``checkpoint`` only used as a label
    checkpoint: str | None = None  # a SANA-WM_streaming release folder (or a DiT file / transformer folder)
    random_weights: bool = False  # the preset with random weights (from ``seed``) even where trained ones ship
    vae: str | None = None  # diffusers VAE folder; default: the checkpoint's ltx2_causal_vae/ or vae/
    text_encoder: str | None = None  # Gemma-2-2B-IT folder or "hash"; default: found beside the checkpoint
    device: str = "cpu"
    dtype: str = "fp32"  # "fp32", "bf16" (weights and activations; recurrent states stay fp32) or "fp8" (bf16 with
    # FP8 block linears, world_model.quantize)
    width: int | None = None  # pixels; default from the preset
    height: int | None = None
    fps: int = 16
    chunk_frames: int = 3  # latent frames per chunk (1-3); chunk 0 holds one more, the image anchor
    timesteps: tuple[int, ...] = STREAMING_TIMESTEPS
    fov_deg: float = 60.0  # horizontal field of view of the intrinsics handed to the model
    seed: int = 0  # random-weight initialisation (presets without a checkpoint)
    rebase_after: int | None = None  # re-base RoPE time once a session reaches this latent frame
    compile: bool = False  # torch.compile each DiT block (GPU; the VAE decoder is never compiled)
    tf32: bool = True  # on CUDA, fp32 matmuls (the GDN state updates) on TF32 tensor cores
    threads: int | None = None  # torch's CPU threads in this process (torch.set_num_threads); None: leave them


@dataclass
class _Session:
    id: str
    prompt: str
    seed: int
    generator: torch.Generator  # noise of this session only: identical alone or batched
    anchor: torch.Tensor  # (1, C, H, W) normalised latent of the start image
    state: SessionState | None = None
    vae_cache: DecoderCache | None = None
    chunk_index: int = 0
    frames_emitted: int = 0
    latent_index: int = 0  # true latent frames generated (RoPE positions may have been re-based below it)

    @property
    def kind(self) -> int:
        """0: first chunk, 1: second (window = sink only), 2: later (sink + previous chunk)."""
        return min(self.chunk_index, 2)


@dataclass
class _PendingWrite:
    """The state write of one batched group of a step, run by ``settle``: the group's sessions, the denoiser
    closure over their stacked state, text and camera, and the clean latents it writes."""

    sessions: list[_Session]
    denoise: Denoiser
    latents: torch.Tensor
    state: SessionState


class StreamingEngine:
    """Implements ``engine_api.Engine`` on a ``SanaWMTransformer``, a ``VideoVAE`` and a text encoder."""

    def __init__(self, model: SanaWMTransformer, vae: VideoVAE, text: TextEncoder, config: EngineConfig) -> None:
        if not 1 <= config.chunk_frames <= 3:
            raise EngineError(f"chunk_frames must be 1, 2 or 3; got {config.chunk_frames}")
        width, height = _size(config)
        self.model, self.vae, self.config = model.eval(), vae, config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.latent_hw = (height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE)
        self.sampler = SamplerConfig(timesteps=tuple(config.timesteps), first_chunk_frames=config.chunk_frames + 1, chunk_frames=config.chunk_frames)
        self.prompts = PromptCache(text, device=self.device, dtype=self.dtype)
        self.intrinsics = torch.tensor(intrinsics_for(width, height, config.fov_deg), dtype=torch.float32)
        table = model.config.rope_max_frames
        self.rebase_after = config.rebase_after or table - 2 * (config.chunk_frames + 1)
        self.info = EngineInfo(
            model=config.model if config.checkpoint is None else Path(config.checkpoint).name,
            width=width,
            height=height,
            fps=config.fps,
            chunk_latent_frames=config.chunk_frames,
            chunk_pixel_frames=VAE_TIME_STRIDE * config.chunk_frames,
            device=str(self.device),
            dtype=config.dtype,
        )
        self._sessions: dict[str, _Session] = {}
        self._pending: list[_PendingWrite] = []  # state writes of the last step, not run yet (settle)
        # A model of the demo geometry (shipped, exported by training or random, over any demo VAE's latent width)
        # knows the procedural renderer's worlds only: it starts from one of its scenes, rendered on the first
        # session that brings no image.
        demo = preset("demo")
        self._renderer_world = dataclasses.replace(model.config, camera_math=demo.camera_math, in_channels=demo.in_channels) == demo
        self._default_image: np.ndarray | None = None

    # ---- sessions -------------------------------------------------------------------------------------

    def open_session(self, *, prompt: str, image: np.ndarray | None = None, seed: int = 0) -> str:
        _check_prompt(prompt)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise EngineError(f"seed must be an integer in [0, 2^63); got {seed!r}")
        rgb = prepare_image(image, self.info.width, self.info.height) if image is not None else self.default_image()
        with torch.inference_mode():
            anchor = self.vae.encode_image(rgb)[:, :, 0].float()
        sid = secrets.token_hex(8)
        self._sessions[sid] = _Session(sid, prompt, seed, torch.Generator().manual_seed(seed), anchor)
        return sid

    def default_image(self) -> np.ndarray:
        """The start image of sessions opened without one: for a model trained on the procedural renderer,
        a held-out scene of it (``start_scenes.DEFAULT_SCENE``); otherwise a plain sky over a ground plane."""
        if self._default_image is None:
            width, height = self.info.width, self.info.height
            if self._renderer_world:
                from .start_scenes import DEFAULT_SCENE, render_scene

                self._default_image = render_scene(DEFAULT_SCENE, width, height, self.config.fov_deg)
            else:
                self._default_image = default_image(width, height)
        return self._default_image

    def set_prompt(self, session_id: str, prompt: str) -> None:
        _check_prompt(prompt)
        self._get(session_id).prompt = prompt

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)  # a write still pending for its batch runs for the others

    def sessions(self) -> list[str]:
        """Ids of the open sessions."""
        return list(self._sessions)

    def state_bytes(self, session_id: str) -> int:
        s = self._get(session_id)
        self.settle()
        return (s.state.nbytes if s.state is not None else 0) + (s.vae_cache.nbytes if s.vae_cache is not None else 0)

    # ---- generation -----------------------------------------------------------------------------------

    def step(self, requests: Sequence[ChunkRequest]) -> list[ChunkResult]:
        sessions = self._check(requests)
        self.settle()  # the state writes of the last step, if the caller has not run them yet
        lost = [s.id for s in sessions if s.chunk_index > 0 and s.state is None]
        if lost:
            raise EngineError(f"session(s) {', '.join(lost)} lost their state in a failed step and cannot continue")
        results: list[ChunkResult | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(sessions):
            groups.setdefault(s.kind, []).append(i)
        with torch.inference_mode():
            for group in groups.values():
                videos, latents = self._advance([sessions[i] for i in group], [requests[i].poses for i in group])
                for i, frames, z in zip(group, videos, latents):
                    s = sessions[i]
                    results[i] = ChunkResult(s.id, s.chunk_index - 1, s.frames_emitted - len(frames), frames, z)
        return results  # type: ignore[return-value]

    def _advance(self, sessions: list[_Session], poses: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One chunk for sessions of one kind, batched; returns each session's new video frames and latents."""
        first = sessions[0].kind == 0
        frames = self.sampler.first_chunk_frames if first else self.sampler.chunk_frames
        noise = torch.cat([torch.randn(1, self.model.config.in_channels, frames, *self.latent_hw, generator=s.generator) for s in sessions])
        noise = noise.to(self.device)
        text, mask = self.prompts.get([s.prompt for s in sessions])
        camera = self._camera(sessions, poses, frames)
        if first:
            state = SessionState(self.model.new_carries())
            cache = self.vae.new_decoder_cache()
            anchor = torch.cat([s.anchor for s in sessions]).to(self.device)
        else:
            state = SessionState.stack([s.state for s in sessions])
            cache = DecoderCache.stack([s.vae_cache for s in sessions])
            anchor = None

        def denoise(x: torch.Tensor, timestep: torch.Tensor, write: bool) -> torch.Tensor:
            return self.model.stream_chunk(x.to(self.dtype), timestep.to(self.device), text, mask, camera, state, write_state=write).float()

        latents = denoise_chunk(denoise, noise, self.sampler, anchor)
        video = self.vae.decode_chunk(latents.to(self.dtype), cache)
        if first:
            video = video[:, :, 1:]  # the start image itself is not emitted
        rgb = self.vae.to_uint8(video)

        self._pending.append(_PendingWrite(sessions, denoise, latents, state))
        for s, own_cache in zip(sessions, cache.split()):
            s.state, s.vae_cache = None, own_cache  # the DiT state follows in settle()
            s.chunk_index += 1
            s.latent_index += frames
            s.frames_emitted += rgb.shape[1]
        return list(rgb), list(latents.to(torch.float16).cpu().numpy())

    def warm_up(self, batches: Sequence[int] = (1, 2)) -> None:
        """Run throwaway sessions through every chunk kind (first, second, later) at each batch size given.

        With compiled blocks this is where compiling happens: one session gets its own graphs and a batch of two
        makes the batch dimension dynamic, so no later batch size or chunk stalls a live session on compiling.
        """
        for batch in batches:
            sessions = [self.open_session(prompt="warm-up", seed=i) for i in range(batch)]
            rigs = [CameraRig() for _ in sessions]
            try:
                for _ in range(3):  # kinds 0, 1, 2
                    self.step([ChunkRequest(sid, np.stack([rig.step(["w"]) for _ in range(self.info.chunk_pixel_frames)]))
                               for sid, rig in zip(sessions, rigs)])
                self.settle()
            finally:
                for sid in sessions:
                    self.close_session(sid)

    def settle(self) -> None:
        """Run the state writes of the last step (the sampler's third step: one forward of each clean chunk).

        The frames of a step do not need them, so a server shows the frames first and calls this while the
        viewers watch; ``step``, ``state_bytes`` and ``export_session`` call it themselves when needed.
        """
        pending, self._pending = self._pending, []
        failure: Exception | None = None
        with torch.inference_mode():
            for work in pending:
                try:
                    write_chunk(work.denoise, work.latents)
                except Exception as exc:  # the other groups still get their writes; these sessions cannot go on
                    failure = failure or exc
                    continue
                for s, own_state in zip(work.sessions, _clone_split(work.state)):
                    if self._sessions.get(s.id) is not s:  # closed meanwhile
                        continue
                    s.state = own_state
                    if s.state.next_frame >= self.rebase_after:
                        delta = s.state.next_frame - (self.sampler.first_chunk_frames + self.sampler.chunk_frames)
                        self.model.rebase_state(s.state, delta)
        if pending and self.device.type == "cuda":  # done when it returns, so a caller's timing of it is the device's
            torch.cuda.synchronize(self.device)
        if failure is not None:
            raise failure

    def _camera(self, sessions: list[_Session], poses: list[np.ndarray], frames: int) -> CameraInputs:
        """Per-session camera inputs of this chunk (poses of the new pixel frames; chunk 0 adds frame 0)."""
        parts = []
        for s, p in zip(sessions, poses):
            p = torch.as_tensor(p, dtype=torch.float32)
            if s.kind == 0:
                p = torch.cat([torch.eye(4)[None], p])
            intr = self.intrinsics.expand(len(p), 4)
            parts.append(chunk_camera_inputs(p[None], intr[None], s.latent_index, frames, self.latent_hw))
        return CameraInputs(
            raymap=torch.cat([c.raymap for c in parts]).to(self.device),
            plucker=torch.cat([c.plucker for c in parts]).to(self.device),
        )

    # ---- suspend / resume -----------------------------------------------------------------------------

    def export_session(self, session_id: str) -> bytes:
        """The whole session (DiT state, VAE cache, noise generator, prompt, counters) as bytes."""
        s = self._get(session_id)
        self.settle()
        tensors = {"anchor": s.anchor.cpu().contiguous(), "generator": s.generator.get_state()}
        if s.state is not None:
            tensors.update({f"state.{k}": v.cpu().contiguous() for k, v in s.state.tensors().items()})
            tensors.update({f"vae.{k}": v.cpu().contiguous() for k, v in s.vae_cache.tensors().items()})
        meta = {
            "prompt": s.prompt,
            "seed": s.seed,
            "chunk_index": s.chunk_index,
            "frames_emitted": s.frames_emitted,
            "latent_index": s.latent_index,
            "next_frame": s.state.next_frame if s.state is not None else None,
            "kinds": s.state.kinds() if s.state is not None else None,
            "model": self.info.model,
            "size": [self.info.width, self.info.height],
        }
        return st_save(tensors, metadata={"session": json.dumps(meta)})

    def import_session(self, data: bytes) -> str:
        """Resume a session exported by ``export_session`` (on this or another engine of the same model)."""
        try:
            tensors = st_load(data)
            meta = json.loads(safetensors_metadata(data)["session"])
        except Exception as exc:  # any corruption reads as one clear error
            raise EngineError(f"not an exported session: {exc}") from None
        if meta["model"] != self.info.model or meta["size"] != [self.info.width, self.info.height]:
            raise EngineError(f"session was exported from {meta['model']} at {meta['size']}, this engine runs {self.info.model} at {[self.info.width, self.info.height]}")
        generator = torch.Generator()
        generator.set_state(tensors["generator"])
        s = _Session(secrets.token_hex(8), meta["prompt"], meta["seed"], generator, tensors["anchor"])
        s.chunk_index, s.frames_emitted, s.latent_index = meta["chunk_index"], meta["frames_emitted"], meta["latent_index"]
        if meta["kinds"] is not None:
            strip = lambda prefix: {k[len(prefix):]: v.to(self.device) for k, v in tensors.items() if k.startswith(prefix)}
            s.state = SessionState.from_tensors(strip("state."), meta["kinds"], meta["next_frame"])
            s.vae_cache = DecoderCache.from_tensors(strip("vae."))
        self._sessions[s.id] = s
        return s.id

    # ---- checks ---------------------------------------------------------------------------------------

    def _get(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise EngineError(f"unknown session {session_id!r}") from None

    def _check(self, requests: Sequence[ChunkRequest]) -> list[_Session]:
        ids = [r.session_id for r in requests]
        if len(set(ids)) != len(ids):
            raise EngineError("a session can appear only once per step")
        want = (self.info.chunk_pixel_frames, 4, 4)
        for r in requests:
            poses = np.asarray(r.poses)
            if poses.shape != want or not np.isfinite(poses).all():
                raise EngineError(f"session {r.session_id}: poses must be finite {want}; got {poses.shape}")
        return [self._get(i) for i in ids]


def _clone_split(state: SessionState) -> list[SessionState]:
    """Per-session states that own their memory: a view would pin the whole batch for as long as any one
    of its sessions waits for its next step. A batch of one already owns its tensors."""
    parts = state.split()
    if len(parts) == 1:
        return parts
    return [SessionState.from_tensors({k: v.clone() for k, v in s.tensors().items()}, s.kinds(), s.next_frame) for s in parts]


def _check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str):
        raise EngineError("prompt must be a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise EngineError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")


def _size(config: EngineConfig) -> tuple[int, int]:
    default = DEFAULT_SIZE.get(config.model, DEFAULT_SIZE["sana-wm-streaming"])
    width, height = config.width or default[0], config.height or default[1]
    if width % VAE_SPATIAL_STRIDE or height % VAE_SPATIAL_STRIDE or width <= 0 or height <= 0:
        raise EngineError(f"width and height must be positive multiples of {VAE_SPATIAL_STRIDE}; got {width}x{height}")
    return width, height


# ---- images --------------------------------------------------------------------------------------------


def prepare_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(height, width, 3)`` uint8 RGB from any RGB/RGBA/grey uint8 image: scaled to cover the target, then
    centre-cropped (the reference pipeline's resize-and-crop), so other aspect ratios keep their centre."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise EngineError(f"image must be a uint8 (H, W[, 1|3|4]) array; got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise EngineError(f"image is {image.shape[1]}x{image.shape[0]}; at least {MIN_IMAGE_SIDE} pixels a side are needed")
    pil = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")
    scale = max(width / pil.width, height / pil.height)
    size = (max(width, math.ceil(pil.width * scale)), max(height, math.ceil(pil.height * scale)))
    pil = pil.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.array(pil.crop((left, top, left + width, top + height)))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB; unreadable files raise ``EngineError`` with one line."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EngineError(f"cannot read image {path}: {exc}") from None


def default_image(width: int, height: int) -> np.ndarray:
    """A plain start scene (sky over a ground plane) for sessions opened without an image."""
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - rows) * np.array([90, 150, 230]) + rows * np.array([200, 225, 250])
    ground = (rows - 0.55).clip(0) / 0.45 * np.array([60, 100, 40]) + np.array([90, 120, 60])
    out = np.where(rows < 0.55, sky, ground) * np.ones((1, width, 1))
    return out.astype(np.uint8)


# ---- building ------------------------------------------------------------------------------------------


def build_engine(model: str = "demo", checkpoint: str | None = None, device: str = "cpu", dtype: str = "fp32", **options) -> StreamingEngine:
    """An engine for a built-in preset (``model``: its shipped trained weights where the package has them, as
    for ``demo``, else random ones; ``random_weights=True`` forces random ones) or a downloaded release
    (``checkpoint``)."""
    config = EngineConfig(model=model, checkpoint=checkpoint, device=device, dtype=dtype, **options)
    if dtype not in DTYPES:
        raise EngineError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if checkpoint is not None and config.random_weights:
        raise EngineError("random_weights and checkpoint exclude each other: random weights are for built-in presets")
    if checkpoint is None and model not in VAE_FOR:
        raise EngineError(f"unknown model {model!r}; built in: {', '.join(sorted(VAE_FOR))}")
    if config.threads is not None:
        if config.threads < 1:
            raise EngineError(f"threads must be at least 1; got {config.threads}")
        torch.set_num_threads(config.threads)
    torch_dtype = DTYPES[dtype]
    root = Path(checkpoint) if checkpoint is not None else None if config.random_weights else shipped_weights(model)
    if root is None:
        cfg = preset(model)
        with torch.random.fork_rng(devices=[]), torch.device(device):  # built in place: 2.7 B params on a GPU
            torch.manual_seed(config.seed)
            transformer = SanaWMTransformer(cfg)
        vae = VideoVAE.from_preset(VAE_FOR[model], seed=config.seed, dtype=torch_dtype, device=device)
        text: TextEncoder = HashTextEncoder(caption_channels=cfg.caption_channels)
    else:
        transformer = load_transformer(root)
        vae_dir = Path(config.vae) if config.vae else _first_dir(root, ("ltx2_causal_vae", "vae"), "causal VAE")
        vae = VideoVAE.from_pretrained(vae_dir, dtype=torch_dtype, device=device)
        text_src = config.text_encoder or _default_text_encoder(root, transformer.config.caption_channels)
        text = text_encoder_for(text_src, transformer.config.caption_channels, device=device, dtype=torch_dtype)
    transformer = transformer.to(device=device, dtype=torch_dtype)
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
    if transformer.config.in_channels != vae.latent_channels:
        raise CheckpointError(f"the DiT expects {transformer.config.in_channels} latent channels, the VAE gives {vae.latent_channels}")
    engine = StreamingEngine(transformer, vae, text, config)
    if dtype == "fp8":
        quantize_fp8(transformer, lambda model: calibration_run(engine, model))
    if config.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # shapes per chunk kind x batch
        for block in transformer.blocks:
            block.compile()
        log.info("compiling the DiT blocks for every chunk kind, one session and several (minutes)")
        engine.warm_up()
    return engine


def calibration_run(engine: StreamingEngine, model: SanaWMTransformer) -> None:
    """The engine's warm-up (one session through every chunk kind) with ``model`` in its place: the inputs FP8
    scales are calibrated on."""
    saved, engine.model = engine.model, model
    try:
        engine.warm_up((1,))
    finally:
        engine.model = saved


def shipped_weights(model: str) -> Path | None:
    """The folder of ``model``'s trained weights inside the package, or None for presets that ship none.
    A preset that should have them but whose files are gone (a stripped install) is an ``EngineError``."""
    root = SHIPPED_WEIGHTS.get(model)
    if root is None:
        return None
    missing = [name for name in _SHIPPED_FILES if not (root / name).is_file()]
    if missing:
        raise EngineError(
            f"the trained {model} model's weights are missing from {root} ({', '.join(missing)}); reinstall "
            f"sana-wm-stream, or use random weights (random_weights=True, --random-weights)"
        )
    return root


def _default_text_encoder(root: Path, caption_channels: int) -> str:
    """The Gemma folder beside the checkpoint; small DiTs trained on hash features (the demo) ship without one."""
    names = ("gemma-2-2b-it", "text_encoder")
    if caption_channels == HASH_CAPTION_CHANNELS and not any((root / name).is_dir() for name in names):
        return HASH_ENCODER_NAME
    return str(_first_dir(root, names, "Gemma-2-2B-IT text encoder (pass text_encoder=DIR)"))


def _first_dir(root: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise CheckpointError(f"{root}: no {what} folder (looked for {', '.join(names)})")
