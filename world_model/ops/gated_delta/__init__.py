"""The frame-wise gated delta rule: a plain-torch reference (``naive``); GPU kernels sit beside it."""

from .naive import frame_gated_delta_rule

__all__ = ["frame_gated_delta_rule"]
