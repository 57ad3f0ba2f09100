"""Loading Stage-1 DiT weights: NVlabs ``.pt``/``.safetensors`` files and diffusers ``transformer/`` folders.

Both key namings load into the same module (diffusers naming is ours). Loading is strict: a missing,
unexpected or mis-shaped key raises ``CheckpointError`` naming it. Pickles load only with
``weights_only=True`` and are memory-mapped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import TransformerConfig

# NVlabs -> diffusers names (sana-wm.md A.3).
_NVLABS_RENAMES = (
    (re.compile(r"^t_embedder\.mlp\.0\."), "t_embedder.linear_1."),
    (re.compile(r"^t_embedder\.mlp\.2\."), "t_embedder.linear_2."),
)
# Tensors NVlabs checkpoints carry that no forward reads; dropped by name (any other extra key is an error).
_NVLABS_UNUSED = frozenset({"pos_embed", "y_embedder.y_embedding"})
_WRAPPERS = ("generator", "state_dict", "model", "module", "ema")
_PREFIXES = ("model.", "module.", "_orig_mod.")

# Where a release folder keeps its Stage-1 DiT, newest layout first (sana-wm.md G).
_DIT_LOCATIONS = (
    "sana_dit/model.pt",
    "sana_dit/model.safetensors",
    "dit/sana_wm_1600m_720p.safetensors",
    "dit/sana_wm_chunk_causal_1600m_720p.safetensors",
    "transformer",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, key or shape at fault."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Raw tensors of one weights file or a diffusers folder (all its ``*.safetensors`` shards)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors weights in this folder")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(_load_file(f))
        return out
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return _load_file(path)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt files, pickles that need code execution, ...
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {_first_line(exc)})") from None
    return _unwrap(obj, path)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = [k for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)]
        if not inner:
            raise CheckpointError(f"{path}: not a state dict (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        obj = obj[inner[0]]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a state dict but a {type(obj).__name__}")
    return dict(obj)


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def to_our_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise either key naming (and NVlabs wrappers/prefixes) to this module's names."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key in _NVLABS_UNUSED:
            continue
        for pattern, repl in _NVLABS_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> TransformerConfig:
    """Read the architecture off tensor shapes (for NVlabs files, which carry no config)."""
    sd = state_dict
    try:
        hidden, in_channels = sd["x_embedder.proj.weight"].shape[:2]
        heads = sd["blocks.0.attn.A_log"].shape[0]
        num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        gdn = [i for i in range(num_layers) if f"blocks.{i}.attn.conv_k.weight" in sd]
        softmax = [i for i in range(num_layers) if i not in gdn]
        every_n = softmax[0] + 1 if softmax else 0
        plucker_blocks = sum(f"blocks.{i}.plucker_proj.weight" in sd for i in range(num_layers))
        inner2 = sd["blocks.0.mlp.inverted_conv.conv.weight"].shape[0]
        kwargs = dict(
            in_channels=int(in_channels),
            num_layers=num_layers,
            hidden_size=int(hidden),
            num_attention_heads=int(heads),
            linear_head_dim=int(hidden) // int(heads),
            softmax_every_n=every_n,
            mlp_ratio=inner2 / 2 / int(hidden),
            t_kernel_size=int(sd["blocks.0.mlp.t_conv.weight"].shape[2]),
            conv_kernel_size=int(sd[f"blocks.{gdn[0]}.attn.conv_k.weight"].shape[-1]) if gdn else 4,
            caption_channels=int(sd["y_embedder.y_proj.fc1.weight"].shape[1]),
            chunk_plucker_channels=int(sd["plucker_embedder.proj.weight"].shape[1]),
            chunk_plucker_post_attn_blocks=plucker_blocks if plucker_blocks < num_layers else num_layers,
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(f"not a SANA-WM Stage-1 state dict (cannot read its shape: missing {exc})") from None
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a model config); anything else is a one-line ``CheckpointError``."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def check_state_dict(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        k = shapes[0]
        problems.append(
            f"mis-shaped keys: {_names(shapes)} (e.g. {k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k])})"
        )
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def _names(keys: list[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def resolve_dit(source: str | Path) -> Path:
    """The Stage-1 weights inside a release folder, a ``transformer/`` folder or a file."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    for rel in _DIT_LOCATIONS:
        candidate = path / rel
        if candidate.exists():
            return candidate
    raise CheckpointError(f"{path}: no Stage-1 DiT found (looked for {', '.join(_DIT_LOCATIONS)})")


def read_config(path: Path) -> dict[str, Any] | None:
    """The diffusers ``config.json`` beside (or in) ``path``, if there is one."""
    folder = path if path.is_dir() else path.parent
    f = folder / "config.json"
    if not f.exists():
        return None
    config = read_json_object(f)
    # Only a diffusers transformer config describes the weights; other JSON files (NVlabs run configs) do not.
    is_diffusers = config.get("_class_name") == "SanaWMTransformer3DModel" or "num_layers" in config
    return config if is_diffusers else None


def load_transformer(
    source: str | Path | Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | TransformerConfig | None = None,
    *,
    camera_math: str = "nvlabs",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """Build the Stage-1 DiT and load weights strictly (interface.md, "Python API").

    ``source``: an NVlabs ``.pt``/``.safetensors`` file, a diffusers ``transformer/`` folder, a release
    folder, or an in-memory state dict in either naming. ``config``: diffusers config keys (read from the
    folder's ``config.json`` when not given, else inferred from the tensor shapes).
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), "state dict"
    else:
        path = resolve_dit(source)
        raw, where = load_state_dict(path), str(path)
        if config is None:
            config = read_config(path)
    state_dict = to_our_names(raw)
    model = _checked_meta_model(state_dict, config, camera_math, where)
    model.load_state_dict(state_dict, strict=True, assign=True)
    target = dtype or _common_dtype(state_dict)
    return model.to(device=device, dtype=target).eval()


def _checked_meta_model(state_dict, config, camera_math: str, where: str):
    """The DiT on the meta device for ``config`` (inferred from the shapes when None), after a strict key check."""
    from .transformer import SanaWMTransformer

    if isinstance(config, TransformerConfig):
        cfg = dataclasses.replace(config, camera_math=camera_math)
    elif config is not None:
        cfg = TransformerConfig.from_diffusers(dict(config), camera_math=camera_math)
    else:
        cfg = infer_config(state_dict, camera_math=camera_math)
    with torch.device("meta"):
        model = SanaWMTransformer(cfg)
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict, where)
    return model


def _common_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


@dataclass
class CheckpointInfo:
    """What ``sana-wm-stream info`` reports about a folder."""

    path: str
    release: str
    dit: str
    dtype: str
    parameters: int
    config: dict[str, Any]
    components: dict[str, bool]

    def lines(self) -> list[str]:
        out = [
            f"checkpoint: {self.path}",
            f"release: {self.release}",
            f"stage-1 DiT: {self.dit} ({self.parameters:,} parameters, {self.dtype})",
            "config: " + ", ".join(f"{k}={self.config[k]}" for k in ("num_layers", "hidden_size", "linear_head_dim", "in_channels")),
        ]
        for name, found in self.components.items():
            out.append(f"  {'found  ' if found else 'missing'} {name}")
        return out


# Components of each release folder (sana-wm.md G).
_RELEASE_COMPONENTS = {
    "SANA-WM_streaming": ("sana_dit", "ltx2_causal_vae", "refiner_diffusers", "gemma3_12b"),
    "SANA-WM_bidirectional": ("dit", "vae", "refiner", "config.yaml"),
    "SANA-WM_chunk_causal": ("dit", "config.yaml"),
    "SANA-WM diffusers pipeline": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
}


def inspect_checkpoint(source: str | Path) -> CheckpointInfo:
    """Check that a folder holds a usable Stage-1 DiT (keys and shapes) and list what else it holds."""
    root = Path(source)
    dit = resolve_dit(root)
    raw = to_our_names(load_state_dict(dit))
    model = _checked_meta_model(raw, read_config(dit), "nvlabs", str(dit))
    cfg = model.config
    release = _release_of(root, dit)
    components = {name: (root / name).exists() for name in _RELEASE_COMPONENTS.get(release, ())}
    return CheckpointInfo(
        path=str(root),
        release=release,
        dit=str(dit.relative_to(root)) if dit != root else dit.name,
        dtype=str(_common_dtype(raw)).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
        config=cfg.to_dict(),
        components=components,
    )


def _release_of(root: Path, dit: Path) -> str:
    if (root / "sana_dit").exists():
        return "SANA-WM_streaming"
    if "chunk_causal" in dit.name:
        return "SANA-WM_chunk_causal"
    if (root / "dit").exists():
        return "SANA-WM_bidirectional"
    if (root / "model_index.json").exists():
        return "SANA-WM diffusers pipeline"
    return "bare Stage-1 DiT (release unknown)"
