"""FP8 block linears for the Stage-1 DiT (``--dtype fp8``): calibrated with NVIDIA's modelopt, multiplied with
``torch._scaled_mm``.

The linears inside the DiT blocks (attention, camera branch, cross-attention, Plücker projection) get FP8 E4M3
weights and per-tensor FP8 inputs. modelopt's max calibration runs on a copy of the model during a short run of
the engine and yields each linear's input and weight amax; the model's own linears are then replaced by
:class:`Fp8Linear`, which quantises its input with the calibrated scale (no host round trip) and calls the
scaled FP8 GEMM (tensor cores on sm_89 and newer; a reference kernel on the CPU). The model thus keeps plain
modules, so ``torch.compile`` traces it and can fuse the input quantisation into the op before it.

The embedders, ``t_block``, the final layer, the FFN's convolutions and the GDN gate projections (too narrow for
FP8 GEMM tiles) stay in bf16, as NVlabs' quantised release keeps its embedders, ``t_block`` and final layer.
modelopt is imported only here, when FP8 is asked for.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

E4M3 = (4, 3)  # modelopt's num_bits for FP8 E4M3
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def fp8_linears(model: nn.Module) -> list[str]:
    """Names of the linears that FP8 quantisation covers: inside ``blocks``, both sides multiples of 16."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith("blocks.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    ]


class Fp8Linear(nn.Module):
    """``x W^T + b`` with ``W`` and ``x`` in FP8 E4M3 and per-tensor scales (W's from its amax, x's calibrated)."""

    def __init__(self, linear: nn.Linear, weight_amax: torch.Tensor, input_amax: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = linear.weight.device
        weight_scale = (weight_amax.float() / E4M3_MAX).clamp_min(1e-12).reshape(()).to(device)
        self.register_buffer("weight", _to_fp8(linear.weight.detach(), weight_scale))
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", (input_amax.float() / E4M3_MAX).clamp_min(1e-12).reshape(()).to(device))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cuBLASLt's FP8 GEMM takes a row-major x only; a token view (e.g. a permuted camera input) is copied once
        x8 = _to_fp8(x, self.input_scale).reshape(-1, self.in_features).contiguous()
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        bias = None if self.bias is None else self.bias.to(out_dtype)
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale, bias=bias, out_dtype=out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8_e4m3"


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # in fp32: the scale is not bf16-exact


def quantize_fp8(model: nn.Module, calibrate: Callable[[nn.Module], None]) -> list[str]:
    """Replace ``model``'s block linears by :class:`Fp8Linear`; ``calibrate(m)`` runs the engine on model ``m``.

    Calibration runs on a copy that modelopt instruments; ``model`` itself only has its linears swapped. Returns
    the names of the quantised linears. Raises ImportError with the install hint without modelopt.
    """
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise ImportError("--dtype fp8 needs nvidia-modelopt: pip install 'sana-wm-stream[fp8]'") from exc
    names = fp8_linears(model)
    per_tensor = {"num_bits": E4M3, "axis": None}
    config = {
        "quant_cfg": [{"quantizer_name": "*", "enable": False}]
        + [{"quantizer_name": f"{name}.{side}_quantizer", "cfg": per_tensor} for name in names for side in ("weight", "input")],
        "algorithm": "max",
    }
    instrumented = mtq.quantize(copy.deepcopy(model), config, forward_loop=calibrate)
    calibrated = dict(instrumented.named_modules())
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        probe = calibrated[name]
        if probe.input_quantizer.amax is None:
            raise RuntimeError(f"FP8 calibration never reached {name}")
        setattr(owner, attr, Fp8Linear(getattr(owner, attr), probe.weight_quantizer.amax, probe.input_quantizer.amax))
    del instrumented, calibrated
    return names
