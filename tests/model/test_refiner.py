"""The Stage-2 refiner: the recipe against diffusers' pipeline, streaming equals one-shot, the bounded window,
resuming, prompt schedules, loading the release layout, and the release's sizes."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
from diffusers.pipelines.sana_wm.refiner import SanaWMLTX2Refiner, _pack_text_embeds
from safetensors.torch import load_file, save_file

from world_model.checkpoint import CheckpointError
from world_model.refiner import REFINER_PRESETS, Refiner, refiner_state_bytes, refiner_transformer

# SanaWMLTX2RefinerTransformer3DModel with diffusers' default (release) config, counted on the meta device.
LTX2_PARAMETERS = 18_876_174_592
LTX2_VIDEO_PARAMETERS = 13_041_520_768
# K/V of sink + 10 history frames at 22x40 latents, 48 layers x 4096 x (K, V), bf16.
LTX2_STATE_BYTES_22x40_BF16 = 7_612_661_760
EXACT = 1e-5  # fp32 tolerance for runs that do the same operations in the same order
PROMPT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def refiner() -> Refiner:
    return Refiner.from_preset("tiny", seed=0)


def _latents(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 16, frames, 4, 8, generator=torch.Generator().manual_seed(seed))


# -- sizes -----------------------------------------------------------------------------------


def test_ltx2_preset_is_the_release_geometry():
    assert REFINER_PRESETS["ltx2"] == {}  # diffusers' defaults
    full = refiner_transformer("ltx2", device="meta")
    assert sum(p.numel() for p in full.parameters()) == LTX2_PARAMETERS
    video = Refiner.from_preset("ltx2", device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in video.transformer.parameters()) == LTX2_VIDEO_PARAMETERS


def test_weights_drawn_on_a_device_are_seeded_and_video_only():
    from world_model.refiner import random_on_device

    draw = lambda seed: random_on_device(refiner_transformer("tiny", device="meta"), seed, torch.bfloat16, "cpu")
    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    weights = torch.cat([p.float().flatten() for p in a.parameters()])
    assert weights.dtype == torch.float32 and abs(weights.std().item() - 0.02) < 2e-3 and torch.isfinite(weights).all()
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in refiner_transformer("tiny", device="meta").parameters())


def test_release_state_bytes_match_the_reference():
    size = refiner_state_bytes(refiner_transformer("ltx2", device="meta").config, (22, 40), torch.bfloat16)
    assert size == LTX2_STATE_BYTES_22x40_BF16
    assert abs(size / 2**30 - 7.1) / 7.1 < 0.05


def test_tiny_preset_builds_fast():
    start = time.perf_counter()
    Refiner.from_preset("tiny", seed=3)
    assert time.perf_counter() - start < 2.0


# -- the recipe ------------------------------------------------------------------------------


def test_shape_first_frame_and_seeds(refiner):
    z = _latents(10)
    out = refiner.refine(z, PROMPT, seed=0)
    assert out.shape == z.shape and out.dtype == z.dtype
    assert torch.equal(out[:, :, 0], z[:, :, 0])
    assert not torch.allclose(out[:, :, 1:], z[:, :, 1:], atol=1e-2)
    assert torch.equal(out, refiner.refine(z, PROMPT, seed=0))
    assert not torch.allclose(out[:, :, 1:], refiner.refine(z, PROMPT, seed=1)[:, :, 1:], atol=1e-3)


def test_equals_diffusers_pipeline(refiner):
    """The same weights, prompt features and noise stream through diffusers' SanaWMLTX2Refiner.__call__."""
    z = _latents(11)
    features, mask = refiner.transformer_inputs(PROMPT)
    pipe = SanaWMLTX2Refiner(
        transformer=refiner_transformer("tiny", seed=0),
        connectors=None,
        tokenizer=None,
        text_encoder=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe._encode_prompt = lambda prompt, device, dtype: (features, mask)
    expected = pipe(z, PROMPT, fps=16.0, generator=torch.Generator().manual_seed(7), output_type="latent")
    torch.testing.assert_close(refiner.refine(z, PROMPT, seed=7), expected, atol=EXACT, rtol=0)


def test_blocks_stream_in_order_and_concatenate_to_refine(refiner):
    z = _latents(10)
    reported = []
    blocks = list(refiner.refine_blocks(z, PROMPT, seed=2, progress=lambda done, total: reported.append((done, total))))
    assert [b.shape[2] for b in blocks] == [1, 3, 3, 3]
    assert reported == [(1, 10), (4, 10), (7, 10), (10, 10)]
    torch.testing.assert_close(torch.cat(blocks, dim=2), refiner.refine(z, PROMPT, seed=2), atol=0, rtol=0)
    assert [b.shape[2] for b in refiner.refine_blocks(_latents(6), PROMPT)] == [1, 3, 2]
    assert [b.shape[2] for b in refiner.refine_blocks(_latents(1), PROMPT)] == [1]


def test_window_never_exceeds_sink_history_and_block(refiner):
    """Record what every self-attention of layer 0 attends to: at most 1 + 10 + 3 frames, reached once trimmed."""
    frames_per_call = []
    tokens_per_frame = 4 * 8

    def record(module, args, kwargs):
        cache, mode = kwargs["kv_cache"], kwargs["kv_cache_mode"]
        prefix = 0
        if mode != "capture_pre_rope":
            prefix = sum(kv[0].shape[1] for kv in (cache.get_sink(), cache.get_history()) if kv is not None)
        frames_per_call.append((prefix + args[0].shape[1]) // tokens_per_frame)

    hook = refiner.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(record, with_kwargs=True)
    try:
        refiner.refine(_latents(22), PROMPT)
    finally:
        hook.remove()
    assert max(frames_per_call) == 1 + 10 + 3
    assert len(frames_per_call) == 1 + 7 * 4  # sink capture, then 3 steps + 1 capture per block


@pytest.mark.parametrize("start_frame", [4, 13, 19])
def test_resume_from_refined_prefix_continues_identically(refiner, start_frame):
    z = _latents(19)
    full = refiner.refine(z, PROMPT, seed=5)
    reported = []
    rest = list(
        refiner.refine_blocks(
            z, PROMPT, seed=5, start_frame=start_frame, refined_prefix=full[:, :, :start_frame].clone(),
            progress=lambda done, total: reported.append(done),
        )
    )
    resumed = torch.cat([full[:, :, :start_frame], *rest], dim=2)
    torch.testing.assert_close(resumed, full, atol=EXACT, rtol=0)
    assert reported == list(range(start_frame + 3, 20, 3))


def test_resume_refuses_a_mid_block_start(refiner):
    with pytest.raises(ValueError, match="block boundary"):
        next(refiner.refine_blocks(_latents(10), PROMPT, start_frame=5, refined_prefix=_latents(5)))
    with pytest.raises(ValueError, match="refined_prefix of shape"):
        next(refiner.refine_blocks(_latents(10), PROMPT, start_frame=4, refined_prefix=_latents(3)))


# -- prompt schedules ------------------------------------------------------------------------

OTHER = "a desert road under a red sky"


class CountingEncoder:
    """A text encoder that records each ``encode`` call's prompts."""

    def __init__(self, encoder) -> None:
        self.encoder, self.calls = encoder, []
        self.caption_channels, self.max_length = encoder.caption_channels, encoder.max_length

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.encoder.encode(prompts)


def test_schedule_of_one_prompt_equals_the_plain_prompt(refiner):
    z = _latents(10)
    assert torch.equal(refiner.refine(z, [(0, PROMPT)], seed=4), refiner.refine(z, PROMPT, seed=4))
    assert torch.equal(refiner.refine(z, ((0, PROMPT), (4, PROMPT)), seed=4), refiner.refine(z, PROMPT, seed=4))


def test_a_prompt_change_conditions_the_blocks_from_it_on(refiner):
    z = _latents(13)  # frame 0, then blocks 1-3, 4-6, 7-9, 10-12
    plain = refiner.refine(z, PROMPT, seed=4)
    changed = refiner.refine(z, [(0, PROMPT), (7, OTHER)], seed=4)
    assert torch.equal(changed[:, :, :7], plain[:, :, :7])
    for start in (7, 10):
        assert not torch.allclose(changed[:, :, start : start + 3], plain[:, :, start : start + 3], atol=1e-3)
    # A block takes the prompt in effect at its first frame: a change inside block 4-6 starts with block 7.
    assert torch.equal(refiner.refine(z, [(0, PROMPT), (5, OTHER)], seed=4), changed)
    # The changed blocks see a window captured under the first prompt: not the same as the other prompt throughout.
    assert not torch.allclose(changed[:, :, 7:], refiner.refine(z, OTHER, seed=4)[:, :, 7:], atol=1e-3)


@pytest.mark.parametrize("start_frame", [4, 10])
def test_resume_with_a_schedule_continues_identically(refiner, start_frame):
    z = _latents(13)
    schedule = [(0, PROMPT), (7, OTHER)]
    full = refiner.refine(z, schedule, seed=5)
    rest = refiner.refine_blocks(z, schedule, seed=5, start_frame=start_frame, refined_prefix=full[:, :, :start_frame].clone())
    torch.testing.assert_close(torch.cat([full[:, :, :start_frame], *rest], dim=2), full, atol=EXACT, rtol=0)


def test_each_prompt_in_use_is_encoded_once(refiner):
    counting = CountingEncoder(refiner.text_encoder)
    scheduled = Refiner(refiner.transformer, counting)
    z = _latents(13)
    out = scheduled.refine(z, [(0, PROMPT), (4, OTHER), (7, PROMPT), (40, "never reached")], seed=1)
    assert counting.calls == [[PROMPT, OTHER]]
    assert torch.equal(out, refiner.refine(z, [(0, PROMPT), (4, OTHER), (7, PROMPT)], seed=1))


@pytest.mark.parametrize("schedule, message", [
    ([], "non-empty"),
    ([(1, PROMPT)], "start at latent frame 0"),
    ([(0, PROMPT), (4, OTHER), (4, PROMPT)], "increasing"),
    ([(0, 7)], r"\(int, str\) pairs"),
    (42, "a str or a sequence"),
])
def test_bad_schedules_are_refused(refiner, schedule, message):
    with pytest.raises(ValueError, match=message):
        next(refiner.refine_blocks(_latents(4), schedule))


# -- the release's prompt path ---------------------------------------------------------------


def _save_tiny_gemma3(folder) -> None:
    """A random Gemma-3 with 24-d states from 2 layers (3 hidden states) and a word-level tokenizer that adds BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for word in PROMPT.split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    special = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    text = dict(vocab_size=len(vocab), hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    text.update(num_key_value_heads=1, head_dim=12, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    model.save_pretrained(folder)


def _tiny_connectors() -> LTX2TextConnectors:
    size = dict(num_attention_heads=2, attention_head_dim=12, num_layers=1, num_learnable_registers=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LTX2TextConnectors(
            caption_channels=24, text_proj_in_factor=3, **{f"{m}_connector_{k}": v for m in ("video", "audio") for k, v in size.items()}
        ).eval()


def test_connectors_normalise_once_like_the_pipeline_twice():
    """Diffusers' refiner pipeline normalises the stacked Gemma states before the connectors, which normalise again."""
    connectors = _tiny_connectors()
    states = torch.randn(1, 16, 24, 3) * 5 + 2
    mask = torch.zeros(1, 16, dtype=torch.int64)
    mask[:, 6:] = 1  # left padding
    with torch.no_grad():
        once = connectors(states.flatten(2, 3), mask, padding_side="left")[0]
        twice = connectors(_pack_text_embeds(states, mask.sum(-1), "cpu", padding_side="left"), mask, padding_side="left")[0]
    torch.testing.assert_close(once, twice, atol=1e-5, rtol=0)


# -- loading ---------------------------------------------------------------------------------


@pytest.fixture
def release(tmp_path):
    """A tiny folder in the streaming layout: refiner_diffusers/{transformer,connectors}, gemma3_12b."""
    refiner_transformer("tiny", seed=4).save_pretrained(tmp_path / "refiner_diffusers" / "transformer")
    _tiny_connectors().save_pretrained(tmp_path / "refiner_diffusers" / "connectors")
    _save_tiny_gemma3(tmp_path / "gemma3_12b")
    return tmp_path


def _load(root, dtype=torch.float32) -> Refiner:
    parts = root / "refiner_diffusers"
    return Refiner.from_pretrained(parts / "transformer", parts / "connectors", root / "gemma3_12b", dtype=dtype)


def test_from_pretrained_round_trip(release):
    loaded = _load(release)
    reference = Refiner.from_preset("tiny", seed=4)
    assert loaded.transformer.state_dict().keys() == reference.transformer.state_dict().keys()
    assert loaded.text_encoder.caption_channels == 24
    same_prompts = Refiner(loaded.transformer, reference.text_encoder)
    z = _latents(7)
    torch.testing.assert_close(same_prompts.refine(z, PROMPT, seed=3), reference.refine(z, PROMPT, seed=3), atol=0, rtol=0)
    assert loaded.refine(z, PROMPT).shape == z.shape  # through Gemma-3 and the connectors


def test_release_prompt_path_equals_diffusers_pipeline(release):
    """Gemma-3 (all hidden states, 1024 left-padded tokens) + connectors, as SanaWMLTX2Refiner._encode_prompt."""
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    loaded = _load(release)
    features, mask = loaded.text_encoder.encode([PROMPT])
    assert features.shape == (1, 1024, 24) and mask.dtype == torch.bool
    assert bool(mask.all())  # the connectors' learnable registers replace the padding
    parts = release / "refiner_diffusers"
    pipe = SanaWMLTX2Refiner(
        transformer=None,
        connectors=LTX2TextConnectors.from_pretrained(parts / "connectors"),
        tokenizer=AutoTokenizer.from_pretrained(release / "gemma3_12b"),
        text_encoder=Gemma3ForConditionalGeneration.from_pretrained(release / "gemma3_12b"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )
    expected, expected_mask = pipe._encode_prompt(PROMPT, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    assert torch.equal(mask, expected_mask.bool())


def test_gemma_with_a_missing_weight_is_refused_when_encoding(release):
    path = release / "gemma3_12b" / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    del tensors[key]
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = _load(release)  # Gemma-3 is read at encoding time
    with pytest.raises(CheckpointError, match="missing keys: .*layers.1.mlp.down_proj"):
        loaded.text_encoder.encode([PROMPT])


@pytest.mark.parametrize("part, key", [("transformer", "proj_out.weight"), ("transformer", "audio_proj_in.weight"), ("connectors", "text_proj_in.weight")])
def test_from_pretrained_names_a_missing_key(release, part, key):
    path = release / "refiner_diffusers" / part / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=f"missing keys: {key}"):
        _load(release)


def test_from_pretrained_names_a_misshaped_key(release):
    path = release / "refiner_diffusers" / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["proj_in.weight"] = torch.zeros(5, 5)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: proj_in\.weight"):
        _load(release)
