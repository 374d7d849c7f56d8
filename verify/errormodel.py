"""The error model of the expert stage: what honest bf16 rounding can do to an output, and the tests that tell it from
a bug (docs/error-model.md).

Honest rounding is noise: small, unbiased, spread over every element, and bounded by how many roundings the stage can
hold and where. A bug is structure: biased (error along the output, a scale error), concentrated on one expert, slot
position, rank or row, or too large for any placement of roundings.

The budget. For every output element the model adds up the variance of each rounding that an honest implementation
MAY make, weighed by the exact intermediates of these very inputs (reference.moe.exact_trace): the least accurate
placement of all. Rounding v to bf16 (round to nearest even) errs uniformly within half an ulp: variance ulp(v)²/12.
- a-level, per slot (reaching the output through w2[e], so shared by a row's elements): h's gate and up values
  (through d a / d gate, d a / d up), the logistic, silu, a itself, and the router weight times a (a weight applied
  before the down GEMM);
- per element: y, the weighted slot, every partial sum of the slots (the larger of both orders), the output, and a
  floor of (u/32)² of the row's mean square for the fp32 accumulations;
- per slot, shared by its row: the router weight rounded to bf16.
Slots of a token that name one expert twice share x, hence their h to y roundings: counted once, weight summed.
An implementation that keeps an intermediate wider has less error than the budget; none honest has more.

The tests, for one output against its exact reference (e = out - exact; every routed row):
- magnitude: sum e² / sum budget, per row, per expert's rows, per rank (combined outputs) and over all rows, must stay
  under chi2.isf(alpha, d) / d, d the independent samples: Satterthwaite's (sum of variances)² / (sum of the
  squared eigenvalues of the budget's covariance), a slot's a-level errors through w2 and its weight's along y being
  correlated over its row;
- bias: the error projected on each part's exact contribution (each expert's, each slot position's, each rank's and
  the whole output) is a scale error s = sum e c / sum c²; its z = sum e c / sd, sd from the budget's covariance
  (a-level terms through w2 exactly, per slot and per row). FAIL when |z| > z_alpha and |s| > SCALE_FLOOR: a scale
  below u/4 is not called a bug (rounding's own second-order bias is of order u²).
alpha = ALPHA per output, split over its tests (Bonferroni): an honest output fails with probability <= ALPHA,
the measured rate is far lower (docs/error-model.md).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from scipy import stats

from reference.moe import Trace, exact_trace
from reference.routing import RankView
from verify.bands import U_BF16 as U
from verify.findings import Check, Finding, Verdict

ALPHA = 1e-6  # the false-alarm probability allowed to one judged output, all of its tests together
SCALE_FLOOR = U / 4  # a scale error smaller than this is not called a bug, however significant
ROW_FLOOR = U / 32  # the rms floor of an element's budget, relative to its row (fp32 accumulation)


def rounding_variance(v: torch.Tensor) -> torch.Tensor:
    """Variance of the error of rounding v (float64 or float32) to bf16, round to nearest even: ulp(v)² / 12, where
    ulp(v) = 2^-7 of the power of two at or below |v| (v's exponent bits alone), 0 where v is 0."""
    as_int, bits = _EXPONENT_BITS[v.dtype]
    power = (v.view(as_int) & bits).view(v.dtype)
    return power * power * (2.0**-14 / 12)


_EXPONENT_BITS = {torch.float64: (torch.int64, 0x7FF0000000000000), torch.float32: (torch.int32, 0x7F800000)}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What honest rounding may add to each element of an output [M, H], per slot and per element (see the module
    docstring). Slots may come from several ranks (`combine`): `expert` then indexes the stacked w2 of all."""

    exact: torch.Tensor  # float64 [M, H]
    element: torch.Tensor  # float64 [M, H]: the per-element independent variance
    token: torch.Tensor  # int64 [n]: each slot's output row
    slot: torch.Tensor  # int64 [n]: its position k
    expert: torch.Tensor  # int64 [n]: its expert, an index into w2
    part: torch.Tensor  # int64 [n]: the rank it ran on (0 for one rank)
    contribution: torch.Tensor  # float64 [n, H]: weight * y, exact
    y: torch.Tensor  # float64 [n, H]
    var_a: torch.Tensor  # float64 [n, I]: a-level variance of the slot, times weight²
    var_weight: torch.Tensor  # float64 [n]: the router weight's rounding
    w2: torch.Tensor  # float64 [E, H, I]
    expert_offset: int = 0  # global id of expert index 0 (for messages)

    def rows_of(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Bool [M]: the rows that hold one of `slots` (bool [n]; all slots: the routed rows)."""
        token = self.token if slots is None else self.token[slots]
        return torch.zeros(self.exact.shape[0], dtype=torch.bool, device=self.exact.device).index_fill_(0, token, True)

    def spread(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the marginal variance of every element [M, H], the sum of the squared eigenvalues of each row's
        covariance [M]): a row's error is a sum of independent parts, each slot's a-level errors through w2[e] and
        its weight's along y (correlated over the row), and the per-element ones; the second gives the independent
        samples a row's squared error sums (Satterthwaite: d = (sum variance)^2 / sum eigenvalue^2)."""
        through_w2 = torch.zeros_like(self.y)
        eigen_sq = self.var_weight**2 * (self.y**2).sum(dim=1) ** 2  # the weight's rounding: rank one per slot
        for e in self.expert.unique().tolist():
            mine = (self.expert == e).nonzero(as_tuple=True)[0]
            w2 = self.w2[e]
            through_w2[mine] = self.var_a[mine] @ (w2**2).T
            gram_sq = (w2.T @ w2) ** 2  # ||w2 D w2^T||_F^2 = d^T (G o G) d, G = w2^T w2
            eigen_sq[mine] += ((self.var_a[mine] @ gram_sq) * self.var_a[mine]).sum(dim=1)
        per_slot = through_w2 + self.var_weight[:, None] * self.y**2
        variance = self.element.clone().index_add_(0, self.token, per_slot)
        row_eigen_sq = (self.element**2).sum(dim=1).index_add_(0, self.token, eigen_sq)
        return variance, row_eigen_sq

    def pairs(self, chunk: int = 512) -> Pairs:
        """Each row's slots by position and the Grams of their exact contributions under the budget's covariance,
        every pair of a row's slots at once: a bias test's variance is a sum of their entries (`Pairs.bias`)."""
        num_rows, device = self.exact.shape[0], self.exact.device
        positions = int(self.slot.max()) + 1 if self.slot.numel() else 1
        table = torch.full((num_rows, positions), -1, dtype=torch.long, device=device)
        table[self.token, self.slot] = torch.arange(self.token.numel(), device=device)
        if int((table >= 0).sum()) != self.token.numel():
            raise ValueError("budget: two slots share a row and a slot position")

        def contributions(rows):  # [r, K, H]: the contributions of the rows' slots, 0 where there is none
            slots = table[rows]
            return torch.where((slots >= 0)[..., None], self.contribution[slots.clamp_min(0)], 0.0)

        through_w2 = torch.zeros(self.token.numel(), positions, positions, dtype=torch.float64, device=device)
        for e in self.expert.unique().tolist():
            for mine in (self.expert == e).nonzero(as_tuple=True)[0].split(chunk):
                c = contributions(self.token[mine])
                projected = c @ self.w2[e]  # w2[e]^T c_q for each slot q of the row: [r, K, I]
                along_y = (c * self.y[mine][:, None, :]).sum(dim=-1)  # c_q . y_j, [r, K]
                through_w2[mine] = (projected * self.var_a[mine][:, None, :]) @ projected.transpose(1, 2) + (
                    self.var_weight[mine][:, None, None] * along_y[:, :, None] * along_y[:, None, :])
        element = torch.zeros(num_rows, positions, positions, dtype=torch.float64, device=device)
        plain = torch.zeros_like(element)
        for rows in torch.arange(num_rows, device=device).split(chunk):
            c = contributions(rows)
            element[rows] = (c * self.element[rows][:, None, :]) @ c.transpose(1, 2)
            plain[rows] = c @ c.transpose(1, 2)
        return Pairs(table, self.token, through_w2, element, plain)


@dataclasses.dataclass(frozen=True)
class Pairs:
    """A budget's slot pairs: for row t and slot positions q, q' (c_q: slot q's exact contribution, [H])."""

    table: torch.Tensor  # int64 [M, K]: the slot at (row, position), -1 for none
    token: torch.Tensor  # int64 [n]: each slot's row
    through_w2: torch.Tensor  # float64 [n, K, K]: (w2 c_q)^T diag(var_a) (w2 c_q') + var_weight (y.c_q)(y.c_q'), slot j
    element: torch.Tensor  # float64 [M, K, K]: sum_h element[t, h] c_q[h] c_q'[h]
    plain: torch.Tensor  # float64 [M, K, K]: c_q . c_q'

    def bias(self, labels: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For slots split into `parts` parts (labels [n]) and c_p = part p's exact contribution [M, H]: (the budget's
        variance of sum(e * c_p), sum(c_p²)), each [parts]; a row's slots of one part add up in c_p."""
        label = torch.where(self.table >= 0, labels[self.table.clamp_min(0)], -1)
        same = (label[:, :, None] == label[:, None, :]) & (label[:, :, None] >= 0)
        target = label[:, :, None].expand_as(same)
        zeros = torch.zeros(parts, dtype=torch.float64, device=labels.device)
        variance = zeros.index_add(0, target[same], self.element[same])
        slot_same = same[self.token]
        variance.index_add_(0, target[self.token][slot_same], self.through_w2[slot_same])
        return variance, zeros.index_add(0, target[same], self.plain[same])


def budget(trace: Trace, w2: torch.Tensor, expert_offset: int = 0) -> Budget:
    """The budget of one rank's output, from its exact trace and its experts' w2 [E_local, H, I]."""
    g, up, w = trace.gate, trace.up, trace.weight
    sigma = torch.sigmoid(g)
    silu = g * sigma
    a = silu * up
    d_gate = up * sigma * (1 + g * (1 - sigma))
    # Slots of one token that name one expert twice share x, so h, silu, a and y and their roundings: such a group
    # counts its shared roundings once, with the group's summed weight, on its first slot.
    key = trace.token * (int(trace.expert.max()) + 1 if trace.expert.numel() else 1) + trace.expert
    _, group = torch.unique(key, return_inverse=True)
    groups, position = int(group.max()) + 1 if group.numel() else 0, torch.arange(group.numel(), device=w.device)
    group_weight = torch.zeros(groups, dtype=w.dtype, device=w.device).index_add_(0, group, w)
    first = torch.full((groups,), group.numel(), device=w.device).scatter_reduce_(0, group, position, reduce="amin")
    first = torch.zeros_like(group, dtype=torch.bool).index_fill_(0, first, True)
    shared = torch.where(first, group_weight[group], 0.0)[:, None]
    weight = w[:, None]
    var_a = (shared**2 * (d_gate**2 * rounding_variance(g) + silu**2 * rounding_variance(up)  # h
                          + (g * up) ** 2 * rounding_variance(sigma)  # the logistic
                          + up**2 * rounding_variance(silu)  # silu
                          + rounding_variance(a))  # a
             + rounding_variance(weight * a))  # the weight applied to a before the down GEMM
    contribution = weight * trace.y
    element = torch.zeros_like(trace.out).index_add_(
        0, trace.token, shared**2 * rounding_variance(trace.y) + rounding_variance(contribution))
    element += torch.maximum(*(_partial_sums_variance(trace, contribution, order) for order in ("slot", "expert")))
    element += rounding_variance(trace.out)
    mean_square = (trace.out**2).mean(dim=1, keepdim=True)
    element += (ROW_FLOOR**2) * mean_square + 1e-300
    return Budget(trace.out, element, trace.token, trace.slot, trace.expert, torch.zeros_like(trace.token),
                  contribution, trace.y, var_a, rounding_variance(w), w2.double(), expert_offset)


def budget_of_view(view: RankView, w13: torch.Tensor, w2: torch.Tensor, gate_up_order: str = "gate_up") -> Budget:
    """The budget of a rank view's output, its experts' weights given."""
    trace = exact_trace(view.x, view.topk_ids, view.topk_weights, w13, w2, ep_size=view.ep_size, ep_rank=view.rank,
                        num_experts=view.num_experts, gate_up_order=gate_up_order)
    return budget(trace, w2, view.rank * view.num_local_experts)


def _partial_sums_variance(trace: Trace, contribution: torch.Tensor, order: str) -> torch.Tensor:
    """Sum over a row's partial sums (from its second local slot on) of their rounding variance, the slots added in
    `order` ("slot": k = 0, 1, ...; "expert": ascending local expert, then slot)."""
    num_rows, k = trace.local_ids.shape
    terms = torch.zeros(num_rows, k, trace.out.shape[1], dtype=torch.float64, device=trace.out.device)
    terms[trace.token, trace.slot] = contribution
    local = trace.local_ids >= 0
    if order == "expert":
        key = torch.where(local, trace.local_ids, 1 << 30) * k + torch.arange(
            k, device=local.device)
        order_of = torch.argsort(key, dim=1)
        terms = torch.gather(terms, 1, order_of[..., None].expand_as(terms))
        local = torch.gather(local, 1, order_of)
    rounded = local & (torch.cumsum(local.long(), dim=1) >= 2)  # a partial sum is rounded when a slot joins it
    return (rounding_variance(torch.cumsum(terms, dim=1)) * rounded[..., None]).sum(dim=1)


def combine(budgets: list[Budget], token_index: list[torch.Tensor], num_tokens: int) -> Budget:
    """The budget of the combined output [num_tokens, H]: rank r's rows added at token_index[r] (-1: padding), its
    slots and experts kept apart (the ranks' w2 stacked)."""
    rows = [b.token for b in budgets]
    first = budgets[0]
    exact = torch.zeros(num_tokens, first.exact.shape[1], dtype=torch.float64, device=first.exact.device)
    element = exact.clone()
    offsets, offset = [], 0
    for b, index in zip(budgets, token_index, strict=True):
        real = index >= 0
        exact.index_add_(0, index[real], b.exact[real])
        element.index_add_(0, index[real], b.element[real])
        offsets.append(offset)
        offset += b.w2.shape[0]
    return Budget(
        exact, element,
        torch.cat([index[r] for index, r in zip(token_index, rows, strict=True)]),
        torch.cat([b.slot for b in budgets]),
        torch.cat([b.expert + o for b, o in zip(budgets, offsets, strict=True)]),
        torch.cat([torch.full_like(b.token, r) for r, b in enumerate(budgets)]),
        torch.cat([b.contribution for b in budgets]), torch.cat([b.y for b in budgets]),
        torch.cat([b.var_a for b in budgets]), torch.cat([b.var_weight for b in budgets]),
        torch.cat([b.w2 for b in budgets]), first.expert_offset)


@dataclasses.dataclass(frozen=True)
class Test:
    """One test of the model on one part of the output, as data (a finding's evidence)."""

    kind: str  # "magnitude" or "bias"
    part: str  # "row", "expert", "slot", "rank", "all"
    index: int | None  # the row, expert (global id), slot position or rank; None for "all"
    statistic: float  # magnitude: sum e² / sum budget; bias: z
    limit: float  # the statistic's bound at this test's alpha
    scale: float | None = None  # bias: the scale error s
    dof: float | None = None  # magnitude: the independent samples d

    @property
    def fails(self) -> bool:
        if self.kind == "magnitude":
            return not self.statistic <= self.limit  # NaN fails
        return abs(self.statistic) > self.limit and abs(self.scale) > SCALE_FLOOR

    @property
    def closeness(self) -> float:
        """How near the test is to failing (1: at its bound)."""
        if math.isnan(self.statistic):
            return math.inf
        if self.kind == "magnitude":
            return self.statistic / self.limit
        return min(abs(self.statistic) / self.limit, abs(self.scale) / SCALE_FLOOR)

    def where(self) -> str:
        names = {"row": "row", "expert": "expert", "slot": "slot position", "rank": "rank", "all": "all rows"}
        return names[self.part] if self.index is None else f"{names[self.part]} {self.index}"

    def describe(self) -> str:
        if self.kind == "magnitude":
            return (f"{self.where()}: error {math.sqrt(max(self.statistic, 0.0)):.2f}x the rms the least accurate "
                    f"honest rounding allows (bound {math.sqrt(self.limit):.2f}x over {self.dof:.0f} samples)")
        return (f"{self.where()}: error along its output, a scale error of {self.scale:+.2e} "
                f"({self.scale / U:+.2f}u, z = {self.statistic:+.1f}; rounding: |z| <= {self.limit:.1f} or |scale| "
                f"<= {SCALE_FLOOR / U:.2f}u)")

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), fails=self.fails, closeness=self.closeness)


def tests(out: torch.Tensor, b: Budget, alpha: float = ALPHA) -> list[Test]:
    """Every test of output `out` [M, H] against its budget: magnitude per row, expert, rank and overall; bias per
    expert, slot position, rank and overall. Their alpha is `alpha` shared out equally."""
    out = out.double()
    error = out - b.exact
    routed = b.rows_of()
    variance, eigen_sq = b.spread()
    families = {"expert": b.expert, "slot": b.slot, "rank": b.part if bool((b.part > 0).any()) else None,
                "all": torch.zeros_like(b.token)}
    families = {name: torch.unique(ids, return_inverse=True) for name, ids in families.items() if ids is not None}
    rows = routed.nonzero(as_tuple=True)[0]
    magnitudes = len(rows) + len(families["expert"][0]) + (len(families["rank"][0]) if "rank" in families else 0) + 1
    biases = sum(len(index) for index, _ in families.values())
    each = alpha / (magnitudes + biases)
    z_limit = float(stats.norm.isf(each / 2))
    found: list[Test] = []

    def magnitude(part, index, row_mask):
        v, e2 = variance[row_mask], error[row_mask] ** 2
        dof = max(1.0, float(v.sum() ** 2 / eigen_sq[row_mask].sum().clamp_min(1e-300)))
        statistic = float(e2.sum() / v.sum()) if torch.isfinite(e2).all() else math.nan
        found.append(Test("magnitude", part, index, statistic, float(stats.chi2.isf(each, dof)) / dof, dof=dof))

    v_row, e2_row = variance.sum(dim=1), (error**2).sum(dim=1)
    dof_row = (v_row**2 / eigen_sq.clamp_min(1e-300)).clamp(min=1.0)
    limits = stats.chi2.isf(each, dof_row[rows].cpu().numpy()) / dof_row[rows].cpu().numpy()
    statistic_row = torch.where(torch.isfinite(e2_row), e2_row / v_row.clamp_min(1e-300), math.nan)
    for t, statistic, limit, dof in zip(rows.tolist(), statistic_row[rows].tolist(), limits.tolist(),
                                        dof_row[rows].tolist(), strict=True):
        found.append(Test("magnitude", "row", t, statistic, limit, dof=dof))
    for e in families["expert"][0].tolist():
        magnitude("expert", e + b.expert_offset, b.rows_of(b.expert == e))
    for r in families["rank"][0].tolist() if "rank" in families else ():
        magnitude("rank", r, b.rows_of(b.part == r))
    magnitude("all", None, routed)

    # Bias: along_p = sum(e * c_p) = the sum of e . contribution over part p's slots; its variance from the pairs.
    pairs = b.pairs()
    along_slot = (error[b.token] * b.contribution).sum(dim=1)
    for part, (index, labels) in families.items():
        along = torch.zeros(len(index), dtype=torch.float64, device=error.device).index_add_(0, labels, along_slot)
        variance_of, size_of = pairs.bias(labels, len(index))
        for i, a, v, cc in zip(index.tolist(), along.tolist(), variance_of.tolist(), size_of.tolist(), strict=True):
            scale = a / cc if cc > 0 else 0.0
            z = a / math.sqrt(v) if v > 0 else (0.0 if a == 0 else math.copysign(math.inf, a))
            where = i + b.expert_offset if part == "expert" else None if part == "all" else i
            found.append(Test("bias", part, where, z if math.isfinite(a) else math.nan, z_limit, scale=scale))
    return found


def judge(out: torch.Tensor, b: Budget, alpha: float = ALPHA) -> list[Finding]:
    """The error model's findings: one FAIL per failing test (bias first, the most significant first), or one PASS
    naming the test closest to its bound."""
    found = tests(out, b, alpha)
    failed = sorted((t for t in found if t.fails), key=lambda t: (t.kind != "bias", -t.closeness))
    if failed:
        return [Finding(Check.ERROR_MODEL, Verdict.FAIL, f"not rounding: {t.describe()}", metric=t.kind,
                        value=t.statistic, limit=t.limit, evidence=t.as_dict()) for t in failed[:4]]
    closest = max(found, key=lambda t: t.closeness)
    return [Finding(Check.ERROR_MODEL, Verdict.PASS, f"honest by the error model ({len(found)} tests at alpha "
                    f"{alpha:g}; closest: {closest.describe()})", metric=closest.kind, value=closest.statistic,
                    limit=closest.limit, evidence=closest.as_dict())]
