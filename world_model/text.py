"""Prompt encoders for the Stage-1 DiT: text -> ``(B, L, caption_channels)`` features and a ``(B, L)`` mask.

* ``GemmaTextEncoder`` reproduces how SANA-WM was trained (sana-wm.md A.1, "text encoder"): Gemma-2-2B-IT, last
  hidden state, 300 tokens. An instruction prefix (the "chi" prompt of the release configs) is prepended to the user
  prompt; the pair is tokenized into a window of ``prefix tokens + 300 - 2`` tokens, right-padded, and reduced to the
  BOS token plus the window's last 299 tokens. With the prefix that keeps BOS, the prefix's last token and up to 298
  prompt tokens; a longer prompt loses its *tail* (the tokenizer truncates before the reduction).
* ``HashTextEncoder`` is a deterministic stand-in for the ``tiny`` preset: nothing to download, stable across
  processes, different prompts give different features.
* ``PromptCache`` keeps encoded prompts so that a session's prompt is encoded once, not once per chunk.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from .checkpoint import CheckpointError, _first_line

# The instruction prefix of every SANA-WM config (``text_encoder.chi_prompt`` in NVlabs' configs/sana_wm/*.yaml,
# ``DEFAULT_CHI_PROMPT`` in diffusers' SanaWMPipeline). Its lines are joined with "\n" and the user prompt follows
# the final "User Prompt: " directly. The model was trained with it; changing it hurts prompt adherence.
SANA_WM_PREFIX_LINES = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image'
    " generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial"
    " relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping"
    " peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street"
    " lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass"
    " skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional"
    " commentary or evaluations:",
    "User Prompt: ",
)
SANA_WM_PREFIX = "\n".join(SANA_WM_PREFIX_LINES)
SANA_WM_MAX_LENGTH = 300  # text_encoder.model_max_length
HASH_ENCODER_NAME = "hash"


class TextEncoder(Protocol):
    """What the engine needs from a prompt encoder."""

    caption_channels: int  # feature width, the DiT's ``caption_channels``
    max_length: int  # L, tokens per prompt (padding included)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, L, caption_channels)`` and a bool mask ``(B, L)``, True on real tokens."""
        ...


class GemmaTextEncoder:
    """Gemma-2 last hidden states of prefix + prompt, reduced to BOS + the last ``max_length - 1`` tokens."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module, *, prefix: str = SANA_WM_PREFIX, max_length: int = SANA_WM_MAX_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.prefix = prefix
        self.max_length = max_length
        self.caption_channels = int(model.config.hidden_size)
        # The prefix's token count includes the BOS the tokenizer adds; the window arithmetic relies on that.
        self._prefix_tokens = len(tokenizer.encode(prefix)) if prefix else 0

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> GemmaTextEncoder:
        """Load tokenizer and model from a local folder (never the network); ``kwargs`` go to the constructor.

        ``folder`` is either a transformers folder holding both (e.g. a copy of ``Efficient-Large-Model/gemma-2-2b-it``)
        or a diffusers pipeline folder with ``tokenizer/`` and ``text_encoder/``. A causal-LM checkpoint loads as its
        base model: only the hidden states are needed. Attention is eager because Gemma-2 soft-caps its attention
        logits, which SDPA would skip.
        """
        tokenizer_dir, model_dir = _gemma_folders(Path(folder))
        try:
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype, attn_implementation="eager")
        except Exception as exc:  # missing files, bad configs, corrupt weights, transformers absent, ...
            raise CheckpointError(f"{folder}: cannot load the Gemma text encoder ({type(exc).__name__}: {_first_line(exc)})") from None
        return cls(tokenizer, model.to(device), **kwargs)

    def tokenize(self, prompts: Sequence[str], *, prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and 0/1 mask ``(B, window)`` the model reads: [prefix +] prompt, truncated and right-padded.

        The window is ``prefix tokens + max_length - 2`` with the prefix, else ``max_length``. Padding is forced to
        the right (Gemma's tokenizer pads on the left by default); truncation follows the tokenizer (right).
        """
        texts, window = list(prompts), self.max_length
        if prefix and self.prefix:
            texts = [self.prefix + p for p in texts]
            window = self._prefix_tokens + self.max_length - 2
        tokens = self.tokenizer(texts, max_length=window, padding="max_length", padding_side="right", truncation=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def encode(self, prompts: Sequence[str], *, prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, max_length, hidden)`` in the model's dtype and a bool mask ``(B, max_length)``.

        ``prefix=False`` encodes the prompt alone in a ``max_length`` window, as the release does for the negative
        prompt.
        """
        ids, mask = self.tokenize(prompts, prefix=prefix)
        hidden = self._last_hidden_state(ids, mask)
        keep = self._kept_positions(ids.shape[1])
        # Indexing outside inference mode gives ordinary tensors, usable anywhere later.
        return hidden[:, keep], mask[:, keep].to(hidden.device, torch.bool)

    @torch.inference_mode()
    def _last_hidden_state(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state

    def _kept_positions(self, window: int) -> list[int]:
        """BOS plus the window's last ``max_length - 1`` positions (all positions when the window is that long)."""
        return [0, *range(window - self.max_length + 1, window)]


def _gemma_folders(folder: Path) -> tuple[Path, Path]:
    """(tokenizer folder, model folder) of a transformers folder or a diffusers pipeline folder."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (expected a local Gemma-2 text encoder: config.json, tokenizer, weights)")
    if (folder / "text_encoder").is_dir():
        return folder / "tokenizer", folder / "text_encoder"
    return folder, folder


class HashTextEncoder:
    """Deterministic word-hash features for small models and tests; no download, no training.

    Words (and punctuation marks) map to ids with CRC-32, which, unlike ``hash()``, is the same in every process.
    Features are rows of a table drawn from a fixed seed plus a sinusoidal position signal. Token 0 is a BOS, so even
    an empty prompt has one real token; prompts longer than ``max_length - 1`` words lose their tail.
    """

    def __init__(
        self,
        caption_channels: int = 24,
        max_length: int = SANA_WM_MAX_LENGTH,
        *,
        vocab_size: int = 4096,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.caption_channels = caption_channels
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.device, self.dtype = torch.device(device), dtype
        self._table = torch.randn(vocab_size, caption_channels, generator=torch.Generator().manual_seed(seed))
        self._positions = 0.1 * _sinusoids(max_length, caption_channels)

    def token_ids(self, prompt: str) -> list[int]:
        """BOS (0) then one id in ``1 .. vocab_size - 1`` per word or punctuation mark, at most ``max_length``."""
        words = re.findall(r"\w+|[^\w\s]", prompt.lower())
        ids = [1 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 1) for w in words]
        return [0, *ids][: self.max_length]

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, max_length, caption_channels)`` (zeros on padding) and a bool mask ``(B, max_length)``."""
        emb = torch.zeros(len(prompts), self.max_length, self.caption_channels)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids = self.token_ids(prompt)
            emb[row, : len(ids)] = self._table[ids] + self._positions[: len(ids)]
            mask[row, : len(ids)] = True
        return emb.to(self.device, self.dtype), mask.to(self.device)


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Transformer-style position features ``(length, channels)``: sin on even channels, cos on odd ones."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, channels, 2, dtype=torch.float64) / channels)
    out = torch.zeros(length, channels, dtype=torch.float64)
    out[:, 0::2] = torch.sin(position * frequency)
    out[:, 1::2] = torch.cos(position * frequency[: channels // 2])
    return out.float()


class PromptCache:
    """LRU cache of encoded prompts in front of a ``TextEncoder``.

    ``get`` encodes only the prompts it has not seen (in one ``encode`` call, each distinct prompt once) and returns
    rows in request order, converted to ``device``/``dtype``. At most ``max_entries`` prompts are kept; the least
    recently requested goes first.
    """

    def __init__(self, encoder: TextEncoder, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.encoder = encoder
        self.device, self.dtype = torch.device(device), dtype
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached features and masks."""
        return sum(emb.nbytes + mask.nbytes for emb, mask in self._entries.values())

    def get(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, L, caption_channels)`` and bool mask ``(B, L)`` of ``prompts``, in order."""
        if not prompts:
            raise ValueError("PromptCache.get needs at least one prompt")
        fresh = self._encode_missing(prompts)
        rows = [fresh[p] if p in fresh else self._hit(p) for p in prompts]
        for prompt, row in fresh.items():
            self._store(prompt, row)
        return torch.stack([emb for emb, _ in rows]), torch.stack([mask for _, mask in rows])

    def _encode_missing(self, prompts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        if not missing:
            return {}
        emb, mask = self.encoder.encode(missing)
        emb, mask = emb.to(self.device, self.dtype), mask.to(self.device, torch.bool)
        # Clones so that each entry owns its memory (a view would keep the whole batch alive).
        return {p: (emb[i].clone(), mask[i].clone()) for i, p in enumerate(missing)}

    def _hit(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._entries.move_to_end(prompt)
        return self._entries[prompt]

    def _store(self, prompt: str, row: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._entries[prompt] = row
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def text_encoder_for(name_or_path: str | Path, caption_channels: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> TextEncoder:
    """``"hash"`` -> ``HashTextEncoder``; a folder -> ``GemmaTextEncoder``, whose width must be ``caption_channels``."""
    if str(name_or_path) == HASH_ENCODER_NAME:
        return HashTextEncoder(caption_channels, device=device, dtype=dtype)
    encoder = GemmaTextEncoder.from_pretrained(name_or_path, device=device, dtype=dtype)
    if encoder.caption_channels != caption_channels:
        raise CheckpointError(f"{name_or_path}: the text encoder gives {encoder.caption_channels}-d features but the DiT expects {caption_channels}")
    return encoder
