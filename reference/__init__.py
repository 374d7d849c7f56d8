"""The golden model: plain torch (and a NumPy oracle), readable, slow is fine. Imports neither kernels nor verify."""

from reference import layouts, rounding, routing, stages
from reference.moe import GATE_UP_ORDERS, MODES, moe_reference
from reference.rounding import PROFILES, Rounding

__all__ = ["GATE_UP_ORDERS", "MODES", "PROFILES", "Rounding", "layouts", "moe_reference", "rounding", "routing",
           "stages"]
