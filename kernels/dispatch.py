"""The dispatch data model: what the scatter hands to the GEMMs, the activation and the gather, and its arithmetic.

One home for the layout names, the row alignment and every size derived from per-expert counts (aligned segment
starts, contiguous rows, masked block rows, the masked buffers' bytes). The executor's memory budget, both scatters
and every GEMM backend use these functions, so what is budgeted is what is allocated. The golden model derives the
same layout facts on its own (reference/layouts.py): it never imports kernels/, so a slip here cannot hide there.

Layouts (docs/contract.md, "Layout contracts"):
- contiguous: flat rows [padded_rows, H]; expert e's segment starts at the exclusive prefix sum of the counts, each
  aligned up to `alignment`; `m_indices` holds e on its valid rows and -1 on padding rows;
- masked: a block [E_local, block_rows, H]; expert e's tokens are the first masked_m[e] = counts[e] rows of block e.
`output_index` (flat row over the layout's rows, -1 for skipped ids) is the authoritative token -> row map.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Sequence

import torch

M_ALIGNMENT = 128  # contiguous segment alignment and masked block-row multiple, for every backend (DeepGEMM SM90's)

Allocator = Callable[..., torch.Tensor]  # like torch.empty(shape, dtype=, device=)


class Layout(str, enum.Enum):
    """The two layouts of the scattered rows. A str, so "masked" == Layout.MASKED and user arguments stay strings."""

    MASKED = "masked"
    CONTIGUOUS = "contiguous"

    def __str__(self) -> str:
        return self.value


LAYOUTS: tuple[Layout, ...] = tuple(Layout)


def align_up(n, alignment: int):
    """The smallest multiple of `alignment` that is >= n (an int, or elementwise on an integer tensor)."""
    return (n + alignment - 1) // alignment * alignment


def contiguous_rows(counts: Sequence[int], alignment: int) -> int:
    """Rows of the contiguous layout: every expert's segment aligned up; an expert with no tokens has no rows."""
    return sum(align_up(c, alignment) for c in counts)


def segment_starts(counts: Sequence[int], alignment: int) -> list[int]:
    """Contiguous layout: the first row of each expert's segment (exclusive prefix sum of the aligned counts)."""
    starts, row = [], 0
    for count in counts:
        starts.append(row)
        row += align_up(count, alignment)
    return starts


def masked_block_rows(counts: Sequence[int], alignment: int) -> int:
    """Rows per expert block of the masked layout: the largest count aligned up (never 0), not M."""
    return max(alignment, align_up(max(counts, default=0), alignment))


def unsynced_block_rows(num_tokens: int, alignment: int) -> int:
    """Rows per expert block when the counts stay on the device (sync="after" / "never"): what the host knows without
    them. An expert receives at most M slots when each row's ids are distinct (a router's top-k), aligned up; a slot
    beyond its block (only a row repeating an id can make one) is dropped and flagged, never written."""
    return max(alignment, align_up(num_tokens, alignment))


def receive_share(num_experts: int, num_local_experts: int, topk: int) -> float:
    """The share of tokens with at least one of their top-k ids on a rank that holds num_local_experts of num_experts,
    when each token's ids are distinct and drawn uniformly: the tokens DeepEP's normal dispatch sends that rank."""
    ways = math.comb(num_experts, topk)
    return 1 - math.comb(num_experts - num_local_experts, topk) / ways if ways else 1.0


def expected_local_slots(num_tokens: int, topk: int, num_experts: int, num_local_experts: int) -> float:
    """Local slots a rank expects among the num_tokens tokens it received, counts unseen: each token's top-k ids fall
    on the rank's experts with probability E_local / E each, and a received token holds at least one of them
    (`receive_share`). Exact for uniform routing; a hint otherwise (skewed routing moves rows between experts, and a
    caller may pass tokens with no local id). At ep 1 every slot is local: M * k."""
    share = receive_share(num_experts, num_local_experts, topk)
    return min(num_tokens * topk, num_tokens * topk * num_local_experts / num_experts / share) if share else 0.0


def expected_fullest_rows(mean_rows: float, num_local_experts: int) -> float:
    """Rows the fullest of E_local experts is expected to hold when their counts scatter around `mean_rows` as
    uniform routing scatters them (binomial, near Poisson): about sqrt(2 ln E_local * mean) above the mean, the
    normal tail's bound for the largest of E_local draws: above the true expectation wherever measured (E_local 2-32,
    mean 1-100: by 0.1-0.67 sqrt(mean); verify/tests/test_stages.py holds it there)."""
    return mean_rows + math.sqrt(2 * math.log(num_local_experts) * mean_rows) if num_local_experts > 1 else mean_rows


SPECULATIVE_MISS_RATE = 1e-3  # how often a uniform routing may overflow a block sized before its counts are read


def speculative_block_rows(num_tokens: int, topk: int, num_experts: int, num_local_experts: int, alignment: int) -> int:
    """Rows per expert block for a masked scatter that runs before the counts are read (sync="before": the GPU
    scatters while the host waits for the counts): a tail bound on the fullest expert under uniform routing, aligned
    up, within the M-row block. An expert's count is a sum of independent per-token draws of mean `mean` (the
    expected local slots' share, `expected_local_slots`), so by Bernstein's inequality and a union over the E_local
    experts, P(some count > mean + t) <= SPECULATIVE_MISS_RATE for t^2 = 2 L (mean + t / 3), L = ln(E_local / rate).
    A routing that puts more on one expert (skewed, or a row repeating an id) overflows the block: the slots that
    found no room are dropped and counted, and the executor scatters again, sized by the counts it read."""
    mean = expected_local_slots(num_tokens, topk, num_experts, num_local_experts) / num_local_experts
    log_term = math.log(num_local_experts / SPECULATIVE_MISS_RATE)
    margin = (2 * log_term / 3 + math.sqrt((2 * log_term / 3) ** 2 + 8 * log_term * mean)) / 2
    rows = max(alignment, align_up(math.ceil(mean + margin), alignment))
    return min(unsynced_block_rows(num_tokens, alignment), rows)


def masked_bytes(num_local_experts: int, block_rows: int, hidden: int, inter: int) -> int:
    """Bytes of the masked layout's bf16 buffers: x [H], h [2I], a [I] and y [H] rows for E_local x block_rows rows."""
    return num_local_experts * block_rows * (2 * hidden + 3 * inter) * 2


def masked_block_bytes(counts: Sequence[int], hidden: int, inter: int, alignment: int) -> int:
    """masked_bytes of the block the counts size."""
    return masked_bytes(len(counts), masked_block_rows(counts, alignment), hidden, inter)


@dataclasses.dataclass(frozen=True)
class LocalRouting:
    """One rank's routing on the device, and what the host knows of its counts.

    `stats` is int32 [E_local + 2] on the device: the ids' per-local-expert histogram, the number of ids outside
    [-1, num_experts), and (written by the scatter) the number of slots dropped for want of room in their expert's
    rows. `counts` are the counts the layout is built from: the histogram, or the caller's host counts."""

    local_ids: torch.Tensor  # int32 [M, k], -1 where not local
    counts: torch.Tensor  # int32 [E_local], on the device
    counts_host: tuple[int, ...] | None  # the same counts on the host; None while not read back
    stats: torch.Tensor

    @property
    def num_local_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def dropped(self) -> torch.Tensor:
        """int32 [1] on the device: the scatter's count of slots that found no room."""
        return self.stats[self.num_local_experts + 1 :]


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The scatter's output: everything the GEMMs, the activation and the gather need."""

    layout: Layout
    rows: torch.Tensor  # contiguous: bf16 [padded_rows, H]; masked: bf16 [E_local, block_rows, H]
    output_index: torch.Tensor  # int32 [M, k]: flat row of each local slot, -1 for skipped ids
    counts: torch.Tensor  # int32 [E_local] on the device (masked_m for the masked layout)
    counts_host: tuple[int, ...] | None  # None when the counts stay on the device (masked layout only)
    alignment: int  # contiguous: segment alignment; masked: block_rows is a multiple of it
    m_indices: torch.Tensor | None = None  # contiguous only: int32 [padded_rows]
    # counts on the device only: the host's estimate of the local slots (`expected_local_slots`); None: every slot
    expected_slots: float | None = None

    @property
    def num_local_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def expected_m(self) -> int:
        """Rows an expert is expected to hold (DeepGEMM's masked-GEMM hint): the mean count when the host has the
        counts, else the expected local slots' share (`expected_slots`; without it every slot's, M * k / E_local),
        within the block."""
        if self.counts_host is not None:
            return max(1, -(-sum(self.counts_host) // self.num_local_experts))
        return max(1, min(self.block_rows, math.ceil(self._unseen_mean_rows)))

    @property
    def _unseen_mean_rows(self) -> float:
        """Counts on the device: the rows per expert the host expects (`expected_slots`, else every slot's share)."""
        slots = self.output_index.numel() if self.expected_slots is None else self.expected_slots
        return slots / self.num_local_experts

    @functools.cached_property  # asked up to four times per call of the host-bound decode path; fields are frozen
    def rows_hint(self) -> int:
        """Rows the fullest expert is expected to hold, for a kernel's tile choice: the largest count when the host has
        the counts, else `expected_fullest_rows` of the rows expected per expert, within the block (counts on the
        device: a hint; a skewed routing can put many more rows on one expert)."""
        if self.counts_host is not None:
            return max(self.counts_host, default=0)
        fullest = expected_fullest_rows(self._unseen_mean_rows, self.num_local_experts)
        return max(1, min(self.block_rows, math.ceil(fullest)))

    @property
    def layout_index(self) -> torch.Tensor:
        """What marks valid rows: m_indices (contiguous) or masked_m = counts (masked)."""
        return self.counts if self.layout is Layout.MASKED else self.m_indices

    @property
    def block_rows(self) -> int:
        """Masked layout: rows per expert block."""
        return self.rows.shape[1]

    def first_rows(self) -> list[int]:
        """The flat row where each expert's rows begin: its segment start, or the first row of its block."""
        if self.layout is Layout.MASKED:
            return [e * self.block_rows for e in range(self.num_local_experts)]
        return segment_starts(self.counts_host, self.alignment)

    def flat_rows(self) -> torch.Tensor:
        """The rows as [num_rows, H], the view `output_index` indexes."""
        return self.rows.reshape(-1, self.rows.shape[-1])
