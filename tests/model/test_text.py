"""Prompt encoders: the Gemma window arithmetic against an independent recomputation, the hash encoder, the cache.

The Gemma tests build a tiny random Gemma-2 and a word-level tokenizer offline. The tokenizer adds BOS only (as
Gemma's does) and pads on the *left* by default (as Gemma's does), so right padding must come from the encoder.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from world_model.checkpoint import CheckpointError
from world_model.text import (
    SANA_WM_PREFIX,
    GemmaTextEncoder,
    HashTextEncoder,
    PromptCache,
    text_encoder_for,
)

PAD, EOS, BOS, UNK = 0, 1, 2, 3
HIDDEN = 32
PROMPT = "a red car drives down a wet street at night"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


def _save_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": UNK}
    for word in _words(SANA_WM_PREFIX + " " + PROMPT + " word"):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )
    fast.save_pretrained(folder)


def _save_model(folder, vocab_size: int) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    Gemma2ForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("gemma")
    _save_tokenizer(folder)
    _save_model(folder, len(AutoTokenizer.from_pretrained(folder, local_files_only=True)))
    return folder


@pytest.fixture(scope="module")
def gemma(gemma_folder):
    return GemmaTextEncoder.from_pretrained(gemma_folder, dtype=torch.float32)


def _expected_window(tokenizer, prompt: str, prefix: bool, max_length: int = 300) -> tuple[list[int], list[int]]:
    """Ids and mask of the window, built by hand: truncate, then pad on the right."""
    if prefix:
        ids = tokenizer(SANA_WM_PREFIX + prompt)["input_ids"]
        window = len(tokenizer(SANA_WM_PREFIX)["input_ids"]) + max_length - 2
    else:
        ids, window = tokenizer(prompt)["input_ids"], max_length
    ids = ids[:window]
    return ids + [PAD] * (window - len(ids)), [1] * len(ids) + [0] * (window - len(ids))


def _reference_hidden(gemma_folder, ids: list[int], mask: list[int]) -> torch.Tensor:
    """Last hidden state of the saved causal LM, read through its own ``output_hidden_states``."""
    from transformers import Gemma2ForCausalLM

    model = Gemma2ForCausalLM.from_pretrained(gemma_folder, local_files_only=True, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask]), output_hidden_states=True)
    return out.hidden_states[-1][0]


def test_gemma_shapes_and_bos_first(gemma):
    emb, mask = gemma.encode([PROMPT, "a car"])
    assert emb.shape == (2, 300, HIDDEN) and emb.dtype == torch.float32
    assert mask.shape == (2, 300) and mask.dtype == torch.bool
    ids, _ = gemma.tokenize([PROMPT, "a car"])
    assert ids[:, 0].tolist() == [BOS, BOS]
    assert gemma.caption_channels == HIDDEN and gemma.max_length == 300


def test_gemma_selects_bos_and_last_299_of_the_right_padded_window(gemma, gemma_folder):
    ids, mask = _expected_window(gemma.tokenizer, PROMPT, prefix=True)
    got_ids, got_mask = gemma.tokenize([PROMPT])
    assert got_ids[0].tolist() == ids and got_mask[0].tolist() == mask  # right-padded despite padding_side="left"

    keep = [0, *range(len(ids) - 299, len(ids))]
    reference = _reference_hidden(gemma_folder, ids, mask)[keep]
    emb, got = gemma.encode([PROMPT])
    torch.testing.assert_close(emb[0], reference, rtol=1e-5, atol=1e-5)
    assert got[0].tolist() == [bool(mask[i]) for i in keep]

    # What survives: BOS, the prefix's last token, the prompt, then padding (masked).
    prompt_tokens = len(_words(PROMPT))
    assert got[0, : 2 + prompt_tokens].all() and not got[0, 2 + prompt_tokens :].any()
    assert ids[keep[1]] == gemma.tokenizer.convert_tokens_to_ids(":")  # last token of "User Prompt: "


def test_gemma_batch_rows_equal_single_prompts(gemma):
    emb, mask = gemma.encode([PROMPT, "a car", ""])
    for row, prompt in enumerate([PROMPT, "a car", ""]):
        single, single_mask = gemma.encode([prompt])
        torch.testing.assert_close(emb[row], single[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(mask[row], single_mask[0])


def test_gemma_long_prompt_keeps_its_head(gemma, gemma_folder):
    """The tokenizer truncates the window on the right before BOS + last 299 is taken, as the release does."""
    long_prompt = " ".join(["word"] * 320)
    emb, mask = gemma.encode([long_prompt, long_prompt + " " + PROMPT])
    assert mask.all()
    torch.testing.assert_close(emb[0], emb[1])  # words past the budget change nothing

    ids, window_mask = _expected_window(gemma.tokenizer, long_prompt, prefix=True)
    keep = [0, *range(len(ids) - 299, len(ids))]
    assert [ids[i] for i in keep[2:]] == [gemma.tokenizer.convert_tokens_to_ids("word")] * 298
    torch.testing.assert_close(emb[0], _reference_hidden(gemma_folder, ids, window_mask)[keep], rtol=1e-5, atol=1e-5)


def test_gemma_without_prefix(gemma, gemma_folder):
    emb, mask = gemma.encode([PROMPT], prefix=False)
    with_prefix, _ = gemma.encode([PROMPT])
    assert not torch.allclose(emb, with_prefix)
    ids, window_mask = _expected_window(gemma.tokenizer, PROMPT, prefix=False)
    torch.testing.assert_close(emb[0], _reference_hidden(gemma_folder, ids, window_mask), rtol=1e-5, atol=1e-5)
    assert mask[0].tolist() == [bool(m) for m in window_mask]


def test_gemma_custom_prefix_and_length(gemma_folder):
    encoder = GemmaTextEncoder.from_pretrained(gemma_folder, dtype=torch.float32, prefix="given a user prompt :", max_length=8)
    emb, mask = encoder.encode([PROMPT])
    assert emb.shape == (1, 8, HIDDEN) and mask.all()
    ids, _ = encoder.tokenize([PROMPT])
    assert ids.shape[1] == 6 + 8 - 2  # BOS + 5 prefix tokens, then the budget


def test_gemma_defaults_to_bf16_and_returns_ordinary_tensors(gemma_folder):
    emb, _ = GemmaTextEncoder.from_pretrained(gemma_folder).encode(["a car"])
    assert emb.dtype == torch.bfloat16
    assert not emb.is_inference()


def test_gemma_loads_a_diffusers_pipeline_layout(gemma_folder, tmp_path, gemma):
    _save_tokenizer(tmp_path / "tokenizer")
    _save_model(tmp_path / "text_encoder", len(gemma.tokenizer))
    encoder = text_encoder_for(tmp_path, HIDDEN, dtype=torch.float32)
    torch.testing.assert_close(encoder.encode([PROMPT])[0], gemma.encode([PROMPT])[0])  # same seed, same weights


@pytest.mark.parametrize("make", ["missing", "empty", "no_weights"])
def test_unusable_folder_raises_checkpoint_error(tmp_path, make):
    folder = tmp_path / "gemma"
    if make != "missing":
        folder.mkdir()
    if make == "no_weights":
        _save_tokenizer(folder)
    with pytest.raises(CheckpointError, match="gemma") as info:
        GemmaTextEncoder.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_factory_checks_the_width(gemma_folder):
    with pytest.raises(CheckpointError, match="32-d features but the DiT expects 2304"):
        text_encoder_for(gemma_folder, 2304)


# -- hash encoder ------------------------------------------------------------------------------------------


def test_hash_encoder_is_deterministic_and_discriminative():
    a, b = HashTextEncoder(24), HashTextEncoder(24)
    emb_a, mask_a = a.encode([PROMPT, "a blue car"])
    emb_b, mask_b = b.encode([PROMPT, "a blue car"])
    assert torch.equal(emb_a, emb_b) and torch.equal(mask_a, mask_b)
    assert emb_a.shape == (2, 300, 24) and emb_a.dtype == torch.float32
    assert not torch.equal(emb_a[0], emb_a[1])
    # Same words in another order differ too (position signal).
    assert not torch.equal(a.encode(["car red"])[0], a.encode(["red car"])[0])


def test_hash_encoder_is_identical_in_another_process():
    code = (
        "import hashlib; from world_model.text import HashTextEncoder; "
        f"e, m = HashTextEncoder(24).encode([{PROMPT!r}]); "
        "print(hashlib.sha256(e.numpy().tobytes() + m.numpy().tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    emb, mask = HashTextEncoder(24).encode([PROMPT])
    assert out.stdout.strip() == hashlib.sha256(emb.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()


def test_hash_encoder_mask_semantics():
    encoder = HashTextEncoder(8, max_length=6)
    emb, mask = encoder.encode(["", "one two", "a b c d e f g h"])
    assert mask.tolist() == [
        [True, False, False, False, False, False],
        [True, True, True, False, False, False],
        [True] * 6,
    ]
    assert not emb[~mask].any() and emb[mask].abs().sum(-1).gt(0).all()
    assert torch.equal(encoder.encode(["a b c d e f g h"])[0], encoder.encode(["a b c d e z"])[0])  # tail dropped


def test_hash_encoder_device_dtype_and_factory():
    encoder = text_encoder_for("hash", 24, dtype=torch.bfloat16)
    assert isinstance(encoder, HashTextEncoder) and encoder.caption_channels == 24
    assert encoder.encode(["x"])[0].dtype == torch.bfloat16


# -- prompt cache ------------------------------------------------------------------------------------------


class CountingEncoder(HashTextEncoder):
    """A hash encoder that records each batch it is asked to encode."""

    def __init__(self) -> None:
        super().__init__(8, max_length=10)
        self.calls: list[list[str]] = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return super().encode(prompts)


def test_cache_does_not_re_encode():
    encoder = CountingEncoder()
    cache = PromptCache(encoder)
    first = cache.get(["a cat"])
    for _ in range(3):
        again = cache.get(["a cat"])
    assert encoder.calls == [["a cat"]]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_cache_mixed_batch_keeps_order_and_encodes_once():
    encoder = CountingEncoder()
    cache = PromptCache(encoder, dtype=torch.float64)
    cache.get(["b"])
    emb, mask = cache.get(["a", "b", "c", "a"])
    assert encoder.calls == [["b"], ["a", "c"]]  # one call for the missing ones, each once
    direct, direct_mask = encoder.encode(["a", "b", "c", "a"])
    assert emb.dtype == torch.float64 and mask.dtype == torch.bool
    assert torch.equal(emb, direct.double()) and torch.equal(mask, direct_mask)


def test_cache_evicts_least_recently_used():
    encoder = CountingEncoder()
    cache = PromptCache(encoder, max_entries=2)
    cache.get(["a"])
    cache.get(["b"])
    cache.get(["a"])  # refreshes "a"
    cache.get(["c"])  # evicts "b"
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    cache.get(["b"])
    assert encoder.calls == [["a"], ["b"], ["c"], ["b"]]


def test_cache_request_larger_than_capacity():
    cache = PromptCache(CountingEncoder(), max_entries=2)
    emb, _ = cache.get(["a", "b", "c"])
    assert emb.shape == (3, 10, 8) and len(cache) == 2


def test_cache_nbytes():
    cache = PromptCache(CountingEncoder())
    assert cache.nbytes == 0
    cache.get(["a", "b"])
    assert cache.nbytes == 2 * (10 * 8 * 4 + 10)


@pytest.mark.parametrize("prompt", [PROMPT, " ".join(["word"] * 320)], ids=["short", "long"])
def test_gemma_matches_diffusers_sana_wm_encode_prompt(gemma, gemma_folder, prompt):
    """Same prefix text, and the same features and mask as ``SanaWMPipeline.encode_prompt`` (diffusers 0.42.1)."""
    from transformers import Gemma2ForCausalLM

    pipeline = pytest.importorskip("diffusers.pipelines.sana_wm.pipeline_sana_wm")
    assert SANA_WM_PREFIX == "\n".join(pipeline.DEFAULT_CHI_PROMPT)
    model = Gemma2ForCausalLM.from_pretrained(gemma_folder, local_files_only=True, dtype=torch.float32, attn_implementation="eager")
    fake_pipeline = SimpleNamespace(tokenizer=gemma.tokenizer, text_encoder=model)
    with torch.no_grad():
        cond, cond_mask, neg, neg_mask = pipeline.SanaWMPipeline.encode_prompt(
            fake_pipeline, prompt, "a car", device=torch.device("cpu"), chi_prompt=pipeline.DEFAULT_CHI_PROMPT
        )
    emb, mask = gemma.encode([prompt])
    torch.testing.assert_close(emb, cond[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, cond_mask.bool())
    emb, mask = gemma.encode(["a car"], prefix=False)
    torch.testing.assert_close(emb, neg[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, neg_mask.bool())
