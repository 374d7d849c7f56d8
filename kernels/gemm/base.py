"""The one small interface every grouped-GEMM backend implements, in the two layouts of a Dispatch.

Both forms compute D = A · Bᵀ per expert (DeepGEMM's "nt"): B is [E_local, N, K] (w13 or w2 as stored).
- contiguous: A [rows, K] flat, expert e's rows are its segment of the Dispatch; D [rows, N];
- masked:     A [E_local, block_rows, K], expert e's rows are the first masked_m[e] of block e;
              D [E_local, block_rows, N].
Rows that hold no token (padding, rows >= masked_m) of D are unspecified: a backend may compute them or not.
"""

from __future__ import annotations

import abc

import torch

from kernels.dispatch import M_ALIGNMENT, Allocator, Dispatch, Layout


class GroupedGemm(abc.ABC):
    name: str
    m_alignment: int = M_ALIGNMENT

    @abc.abstractmethod
    def availability(self, device: torch.device) -> tuple[bool, str]:
        """(True, why) when this backend can run on `device`, else (False, the reason). Never raises."""

    def shape_problem(self, hidden: int, inter: int) -> str | None:
        """None when H (K of the gate+up GEMM) and I (K of the down GEMM) suit this backend, else the reason."""
        return None

    @abc.abstractmethod
    def m_grouped_gemm_nt_contiguous(self, a: torch.Tensor, b: torch.Tensor, dispatch: Dispatch,
                                     empty: Allocator) -> torch.Tensor: ...

    @abc.abstractmethod
    def m_grouped_gemm_nt_masked(self, a: torch.Tensor, b: torch.Tensor, dispatch: Dispatch,
                                 empty: Allocator) -> torch.Tensor: ...

    def gate_up_silu(self, rows: torch.Tensor, w13: torch.Tensor, dispatch: Dispatch, gate_up_order: str,
                     empty: Allocator) -> torch.Tensor | None:
        """silu_and_mul of the gate+up GEMM in one step (kernels/activation.py's result on the valid rows), or None
        where this backend does not fuse them for this Dispatch (the default): the caller then runs the two stages."""
        return None

    def __call__(self, a: torch.Tensor, b: torch.Tensor, dispatch: Dispatch, empty: Allocator = torch.empty):
        """The form that matches the Dispatch's layout."""
        if dispatch.layout is Layout.MASKED:
            return self.m_grouped_gemm_nt_masked(a, b, dispatch, empty)
        return self.m_grouped_gemm_nt_contiguous(a, b, dispatch, empty)

    def __repr__(self) -> str:
        return f"<{self.name} grouped GEMM>"
