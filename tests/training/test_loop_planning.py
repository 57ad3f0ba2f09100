"""Training runs that plan their own length and stop by a wall-clock time, and exported weights split into
files small enough for a lent device call to hand back."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from safetensors.torch import load_file

from world_model.checkpoint import load_state_dict
from world_model.training import train_vae, weights
from world_model.training.common import CHECKPOINT_NAME, LoopConfig, read_log, train
from world_model.vae import VideoVAE


class _Slow(torch.nn.Module):
    """A one-weight model whose steps take ~5 ms, so a planned length is some hundred steps."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        time.sleep(0.005)
        target = torch.randn(4, generator=torch.Generator().manual_seed(step))
        return (self.w - target).square().mean(), {}


def test_a_planned_run_equals_a_run_of_its_planned_length(tmp_path):
    config = LoopConfig(steps=0, lr=0.01, warmup=12, plan_at=9, minutes=0.02)
    planned = _Slow()
    train(planned, planned.loss, config, tmp_path / "planned", resume=False, stop_at=11)  # cut after planning
    steps = torch.load(tmp_path / "planned" / CHECKPOINT_NAME, weights_only=True)["loop"]["steps"]
    assert 11 < steps < 1000
    train(planned, planned.loss, dataclasses.replace(config, minutes=1.0), tmp_path / "planned", resume=True)  # its length, from the checkpoint
    fixed = _Slow()
    train(fixed, fixed.loss, dataclasses.replace(config, steps=steps, minutes=1.0), tmp_path / "fixed", resume=False)
    lrs = lambda run: [(r["step"], r["lr"]) for r in read_log(tmp_path / run / "log.csv")]
    assert lrs("planned") == lrs("fixed") and len(lrs("fixed")) == steps
    assert torch.equal(planned.w, fixed.w)


def test_end_by_stops_the_run_and_unplanned_lengths_are_refused(tmp_path):
    model = _Slow()
    began = time.monotonic()
    step = train(model, model.loss, LoopConfig(steps=10_000, warmup=1, minutes=5.0, end_by=time.time() + 0.3), tmp_path, resume=False)
    assert 0 < step < 10_000 and time.monotonic() - began < 5.0
    with pytest.raises(ValueError, match="plan_at <= warmup"):
        LoopConfig(steps=0, warmup=10, plan_at=30)



def test_weights_split_into_shards_and_merge_back(tmp_path):
    vae = VideoVAE.from_preset("tiny", seed=2)
    train_vae.export_vae(vae, tmp_path / "vae")
    whole = load_file(str(tmp_path / "vae" / train_vae.WEIGHTS_NAME))
    limit = max(t.numel() * t.element_size() for t in whole.values())  # the largest tensor fits, alone
    shards = weights.rewrite_folder(tmp_path / "vae", tmp_path / "shards", max_bytes=limit)
    assert len(shards) > 2 and all(p.stat().st_size <= limit + 20_000 for p in shards)  # + the safetensors header
    with pytest.raises(ValueError, match="larger than one shard"):
        weights.save_weights(whole, tmp_path / "small", max_bytes=limit - 1)
    assert (tmp_path / "shards" / "config.json").is_file()
    split = load_state_dict(tmp_path / "shards")
    assert split.keys() == whole.keys() and all(torch.equal(split[k], whole[k]) for k in whole)
    assert torch.equal(VideoVAE.from_pretrained(tmp_path / "shards").model.latents_std, vae.model.latents_std.to(torch.bfloat16))
    (merged,) = weights.rewrite_folder(tmp_path / "shards", tmp_path / "merged", max_bytes=None)
    assert merged.name == train_vae.WEIGHTS_NAME and load_file(str(merged)).keys() == whole.keys()
