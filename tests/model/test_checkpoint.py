"""Loading weights: both key namings, every on-disk format, strict errors, and ``sana-wm-stream info``."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from stream_server.cli import main as cli_main
from world_model import CheckpointError, TransformerConfig, load_transformer, preset
from world_model.transformer import SanaWMTransformer

RELEASE_PARAMETERS = 2_661_800_448


@pytest.mark.parametrize("name", ["sana-wm-streaming", "sana-wm-bidirectional"])
def test_release_presets_have_the_release_parameter_count(name):
    with torch.device("meta"):
        model = SanaWMTransformer(preset(name))
    assert sum(p.numel() for p in model.parameters()) == RELEASE_PARAMETERS
    assert len(model.state_dict()) == 870


def _tiny_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = SanaWMTransformer(preset("tiny"))
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.state_dict().items()}


def _nvlabs_naming(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k.replace("t_embedder.linear_1.", "t_embedder.mlp.0.").replace("t_embedder.linear_2.", "t_embedder.mlp.2."): v for k, v in sd.items()}
    out["pos_embed"] = torch.zeros(1, 16, 96)  # carried by NVlabs checkpoints, never read
    out["y_embedder.y_embedding"] = torch.zeros(8, 24)
    return out


def _diffusers_config() -> dict:
    cfg = preset("tiny").to_dict()
    cfg.pop("camera_math")
    return {"_class_name": "SanaWMTransformer3DModel", "_diffusers_version": "0.42.1", "patch_size": [1, 1, 1], **cfg}


def _write_diffusers_folder(root, sd):
    folder = root / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(_diffusers_config()))
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _inputs():
    gen = torch.Generator().manual_seed(3)
    frames, pixel = 4, 25
    c2w = torch.eye(4).repeat(1, pixel, 1, 1)
    c2w[0, :, 2, 3] = torch.linspace(0, 0.5, pixel)
    intr = torch.tensor([80.0, 80.0, 48.0, 32.0]).repeat(1, pixel, 1)
    return (
        torch.randn(1, 16, frames, 2, 3, generator=gen),
        torch.full((1, frames), 500.0),
        torch.randn(1, 5, 24, generator=gen),
        torch.ones(1, 5, dtype=torch.bool),
        c2w,
        intr,
    )


def _velocity(model):
    with torch.no_grad():
        return model(*_inputs(), mode="chunk_causal")


def test_both_namings_and_all_formats_load_the_same_weights(tmp_path):
    sd = _tiny_state_dict()
    nv = _nvlabs_naming(sd)
    reference = _velocity(load_transformer(sd))
    # NVlabs .pt with the streaming release's wrapping ("generator", "model." prefix)
    torch.save({"generator": {"model." + k: v for k, v in nv.items()}}, tmp_path / "model.pt")
    # NVlabs .safetensors
    save_file(nv, str(tmp_path / "nv.safetensors"))
    folder = _write_diffusers_folder(tmp_path / "diffusers", sd)
    sources = [nv, tmp_path / "model.pt", tmp_path / "nv.safetensors", folder, tmp_path / "diffusers"]
    for source in sources:
        torch.testing.assert_close(_velocity(load_transformer(source)), reference, rtol=0, atol=0)


def test_config_from_folder_and_dtype(tmp_path):
    sd = {k: v.bfloat16() for k, v in _tiny_state_dict().items()}
    folder = _write_diffusers_folder(tmp_path, sd)
    model = load_transformer(folder)
    assert model.config.hidden_size == 96 and model.dtype == torch.bfloat16
    assert load_transformer(folder, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: sd.pop("blocks.1.attn.conv_k.weight"), "missing keys: blocks.1.attn.conv_k.weight"),
        (lambda sd: sd.__setitem__("blocks.0.attn.extra", torch.zeros(1)), "unexpected keys: blocks.0.attn.extra"),
        (lambda sd: sd.__setitem__("blocks.2.mlp.t_conv.weight", torch.zeros(96, 96, 5, 1)), "mis-shaped keys: blocks.2.mlp.t_conv.weight"),
    ],
)
def test_bad_state_dicts_name_the_key(tmp_path, mutate, message):
    sd = _tiny_state_dict()
    mutate(sd)
    folder = _write_diffusers_folder(tmp_path, sd)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        load_transformer(folder)


def test_unloadable_files_get_clear_errors(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_transformer(tmp_path / "garbage.pt")

    class Evil:  # a pickle that needs code execution: refused by weights_only=True
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_transformer(tmp_path / "evil.pt")

    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "step": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a state dict|not a SANA-WM"):
        load_transformer(tmp_path / "other.pt")

    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer(tmp_path / "missing")


def test_unsupported_config_option_is_refused(tmp_path):
    folder = _write_diffusers_folder(tmp_path, _tiny_state_dict())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["ffn_type"] = "mlp"
    with pytest.raises(ValueError, match="ffn_type"):
        load_transformer(folder, cfg)


def test_info_reports_each_format(tmp_path, capsys):
    sd = _tiny_state_dict()
    streaming = tmp_path / "SANA-WM_streaming"
    (streaming / "sana_dit").mkdir(parents=True)
    (streaming / "ltx2_causal_vae").mkdir()
    torch.save({"generator": _nvlabs_naming(sd)}, streaming / "sana_dit" / "model.pt")
    bidirectional = tmp_path / "SANA-WM_bidirectional"
    (bidirectional / "dit").mkdir(parents=True)
    save_file(_nvlabs_naming(sd), str(bidirectional / "dit" / "sana_wm_1600m_720p.safetensors"))
    diffusers = tmp_path / "pipeline"
    _write_diffusers_folder(diffusers, sd)
    (diffusers / "model_index.json").write_text("{}")

    expected = {streaming: "SANA-WM_streaming", bidirectional: "SANA-WM_bidirectional", diffusers: "diffusers pipeline"}
    params = sum(v.numel() for k, v in sd.items() if not k.endswith("recall_gate"))  # buffers are not parameters
    for folder, release in expected.items():
        assert cli_main(["info", "--checkpoint", str(folder)]) == 0
        out = capsys.readouterr().out
        assert release in out
        assert "missing refiner_diffusers" in out or folder != streaming
        assert f"{params:,} parameters" in out


def test_info_fails_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "stream_server.cli", "info", "--checkpoint", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "no Stage-1 DiT found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_json_roundtrip(tmp_path):
    cfg = preset("tiny")
    cfg.save(tmp_path / "config.json")
    again = TransformerConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg
