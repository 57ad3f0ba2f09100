"""FP8 block linears for the Stage-1 DiT, with NVIDIA's modelopt (``--dtype fp8``).

The linears inside the DiT blocks (attention, camera branch, cross-attention, Plücker projection) get FP8 E4M3
weights and per-tensor FP8 inputs with scales calibrated on a short run of the model itself (max calibration);
on an FP8 GPU (sm_89 and newer) they multiply in FP8 with ``torch._scaled_mm``, elsewhere modelopt falls back
to simulated quantisation. The embedders, ``t_block``, the final layer, the convolutions of the FFN and the
GDN gate projections (too narrow for FP8 GEMM tiles) stay in bf16, as NVlabs' quantised release keeps its
embedders, ``t_block`` and final layer. modelopt is imported only here, when FP8 is asked for.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch.nn as nn

E4M3 = (4, 3)


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


def quantize_fp8(model: nn.Module, calibrate: Callable[[], None]) -> list[str]:
    """Quantise ``model``'s block linears to FP8 in place; ``calibrate()`` runs the model on typical inputs.

    Returns the names of the quantised linears. Raises ImportError with the install hint without modelopt.
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
    # modelopt warns once per layer where the device has no FP8 GEMM (it then simulates) and that real
    # quantisation is experimental; neither says anything per layer that the caller can act on.
    warnings.filterwarnings("ignore", message="RealQuantLinear: No real-quant GEMM found")
    warnings.filterwarnings("ignore", message="Real quantization has been applied")
    mtq.quantize(model, config, forward_loop=lambda _: calibrate())
    mtq.compress(model)  # FP8 weights in memory; the real FP8 GEMM where the GPU has one
    return names
