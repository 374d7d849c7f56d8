"""The production pipeline: a bf16 MoE expert stage under DeepEP normal mode (see executor.py).

Imports torch, triton and (lazily) deep_gemm; never reference/ or verify/."""

from kernels._device import configure_triton

configure_triton()  # TRITON_INTERPRET=1 on a CPU-only machine, before triton is imported

from kernels.dispatch import Dispatch, Layout  # noqa: E402
from kernels.executor import PRODUCTION, Stages, choose_layout, moe_expert_forward  # noqa: E402
from kernels.graphs import GraphedExpertStage  # noqa: E402

__all__ = ["PRODUCTION", "Dispatch", "GraphedExpertStage", "Layout", "Stages", "choose_layout", "moe_expert_forward"]
