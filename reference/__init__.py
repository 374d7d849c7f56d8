"""The golden model: plain torch (and a NumPy oracle), readable, slow is fine. Imports neither kernels nor verify."""

from reference import layouts, routing, stages
from reference.moe import GATE_UP_ORDERS, MODES, moe_reference

__all__ = ["GATE_UP_ORDERS", "MODES", "layouts", "moe_reference", "routing", "stages"]
