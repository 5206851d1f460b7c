"""Size-budgeted mixed precision: each weight group's storage chosen to minimise the summed predicted loss
under a byte budget (``precision.max_size_mb``).

The groups are what the graph stores as one matrix: each layer's packed qkv, o, packed gate/up and down,
plus the tables (embedding and lm_head, one joint choice, since a tied model's lm_head may share the
embedding's blobs, and lm_head may keep its first rows in int8). A group's predicted loss at a candidate
is its measured sensitivity (``edge.check.sensitivity``: the KL increase when it alone is quantized so);
losses are summed as if independent. Its bytes are the initializers the exporter's own graph
(``DecoderGraph``) declares for that storage, so the prediction is what ``export`` writes, alignment of
the data file included.

The choice is a multiple-choice knapsack solved exactly by dynamic programming over byte units of a size
fixed per model (so a bigger budget never predicts more loss); units are rounded up, so the budget holds.

``precision.max_read_mb`` adds a second budget: the weight bytes a decode step reads (every initializer
but the rows a gather picks: the embedding table, unless lm_head shares it, is not read per token), which
bounds decode speed where memory bandwidth does. Both budgets are met by Lagrangian relaxation, twice:
the dynamic program runs exact in one budget while each option's loss is charged a price per byte of the
other, the smallest price whose plan fits that budget is found by bisection, and what the plan leaves of
both budgets is spent by one-group upgrades, best first; the better of the two plans is kept. When one
budget does not bind (the usual case: a read budget below what the size budget would read), the plan
exact in the binding one is the optimum.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge.check import sensitivity
from edge.config import QwenConfig
from edge.graph.decoder import DecoderGraph, GraphOptions, gathered_initializers
from edge.graph.plan import GROUPS, WeightPlan
from edge.quantize.blockwise import QuantSpec
from edge.recipe import Precision
from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError

TABLES = "tables"
UNITS = 1 << 14  # DP resolution: the spread between a model's smallest and largest artifact, in this many units
# onnx-ir's save: tensors larger than INLINE_BYTES go to the data file, where those larger than
# ALIGN_THRESHOLD start at an aligned offset (see data_file_bytes)
INLINE_BYTES = 256
ALIGN_THRESHOLD = 1 << 20
_BLOB = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.(?:qweight|scales|zero_points|weight_t)$")
_PARTS = {suffix: parts for suffix, parts in GROUPS.values()}


class BudgetError(QwenEdgeError):
    """A size budget no storage mix reaches."""


@dataclass(frozen=True)
class Option:
    """One storage of one group: its label, bytes, predicted loss and the bytes a decode step reads of it."""

    label: str
    bytes: int
    loss: float
    read: int = 0


@dataclass(frozen=True)
class Allocation:
    """The chosen plan and what was predicted for it."""

    plan: WeightPlan
    choices: dict[str, Option]  # group -> chosen option
    predicted_bytes: int  # the artifact's data file plus tokenizer files
    budget_bytes: int
    predicted_read_bytes: int  # weight bytes a decode step reads
    read_budget_bytes: int | None = None

    @property
    def predicted_kl(self) -> float:
        return sum(o.loss for o in self.choices.values())

    def manifest_block(self) -> dict:
        """The manifest's ``allocation`` entry (the pipeline adds the measured mean KL after the fidelity check)."""
        return {
            "budget_bytes": self.budget_bytes,
            "predicted_bytes": self.predicted_bytes,
            "read_budget_bytes": self.read_budget_bytes,
            "predicted_read_bytes": self.predicted_read_bytes,
            "predicted_mean_kl": self.predicted_kl,
            "tensors": {
                g: {"storage": o.label, "bytes": o.bytes, "predicted_kl": o.loss} for g, o in self.choices.items()
            },
        }


def _tensors(config: QwenConfig, plan: WeightPlan, context_length: int) -> tuple[list[tuple[str, int]], set[str]]:
    """(name, bytes) of every initializer the exporter writes for `plan`, in the order it writes them, and
    the names of those a decode step reads only rows of (`gathered_initializers`)."""

    def unread(name, rows=None):  # only shapes and dtypes are looked at
        raise AssertionError(f"the size of a plan reads no weights ({name})")

    if plan.lm_head_int8_rows and not plan.lm_head_int8_ids:  # which rows does not change a byte
        plan = replace(plan, lm_head_int8_ids=tuple(range(plan.lm_head_int8_rows)))
    model = DecoderGraph(config, unread, plan, GraphOptions(context_length)).build()
    tensors = [(name, v.const_value.nbytes) for name, v in model.graph.initializers.items()]
    return tensors, gathered_initializers(model.graph)


def _read_bytes(tensors: list[tuple[str, int]], gathered: set[str]) -> int:
    return sum(size for name, size in tensors if name not in gathered)


def data_file_bytes(tensors: list[tuple[str, int]]) -> int:
    """Size of the external data file ``onnx_ir.save`` writes with ``alignment=contract.ALIGNMENT``: the
    tensors larger than INLINE_BYTES, in order, those larger than ALIGN_THRESHOLD at a multiple of the alignment."""
    offset = 0
    align = max(4096, contract.ALIGNMENT)
    for _, size in tensors:
        if size <= INLINE_BYTES:
            continue  # stays in the graph file
        if size > ALIGN_THRESHOLD:
            offset = -(-offset // align) * align
        offset += size
    return offset


def _group_of(name: str) -> str | None:
    """The group an initializer belongs to: a linear's graph key, TABLES, or None (no choice changes it)."""
    if name.startswith(("model.embed_tokens", "lm_head")):
        return TABLES
    match = _BLOB.match(name)
    return match.group(1) if match else None


def _group_bytes(tensors: list[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, size in tensors:
        group = _group_of(name)
        if group:
            out[group] = out.get(group, 0) + size
    return out


def tokenizer_bytes(source) -> int:
    """Bytes of the tokenizer files the artifact ships."""
    with tempfile.TemporaryDirectory() as tmp:
        source.write_tokenizer(Path(tmp))
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def _plan(tables: tuple[QuantSpec, QuantSpec, int], linears: dict[str, QuantSpec]) -> WeightPlan:
    embedding, lm_head, rows = tables
    overrides = tuple(
        (f"{group.rsplit('.', 2)[0]}.{part}.weight", spec)
        for group, spec in linears.items()
        for part in _PARTS[group.split(".", 3)[3]]
    )
    default = next(iter(linears.values())) if linears else lm_head
    return WeightPlan(default, embedding, lm_head, overrides, rows)


def _table_options(precision: Precision, config: QwenConfig) -> dict[str, tuple[QuantSpec, QuantSpec, int]]:
    """Every (embedding, lm_head, int8 rows) mix, by label ``embedding/lm_head``."""
    specs = sensitivity.candidates(precision.symmetric)
    rows = [r for r in sensitivity.LM_HEAD_ROWS if r < config.vocab_size]
    heads = {label: (spec, 0) for label, spec in specs.items()}
    heads.update(
        {sensitivity.head_label(label, r): (spec, r) for label, spec in specs.items() if spec.bits == 4 for r in rows}
    )
    return {f"{e}/{h}": (specs[e], spec, r) for e in specs for h, (spec, r) in heads.items()}


class Sizer:
    """Bytes of every candidate of every group for one model, and the bytes a decode step reads of it, from
    the exporter's graph (no weights read)."""

    def __init__(self, source, precision: Precision, context_length: int):
        config = source.config
        self.config, self.context_length = config, context_length
        self.specs = sensitivity.candidates(precision.symmetric)
        self.groups = sensitivity.linear_groups(config.num_layers)
        self.tables = _table_options(precision, config)
        table = next(iter(self.tables))
        self.linear_bytes: dict[str, dict[str, int]] = {g: {} for g in self.groups}
        for label in self.specs:
            tensors, _ = self._tensors(self.plan(dict.fromkeys(self.groups, label), table))
            sizes = _group_bytes(tensors)
            for g in self.groups:
                self.linear_bytes[g][label] = sizes[g]
        some = dict.fromkeys(self.groups, sensitivity.REFERENCE)
        # the tables' bytes do not depend on the layers: size them on a one-layer graph (one per mix)
        one = dataclasses.replace(config, num_layers=1)
        self.table_bytes, self.table_read = {}, {}
        for t in self.tables:
            tensors, gathered = _tensors(one, self.plan({}, t), context_length)
            tables = [(name, size) for name, size in tensors if _group_of(name) == TABLES]
            self.table_bytes[t] = sum(size for _, size in tables)
            self.table_read[t] = _read_bytes(tables, gathered)
        tensors, gathered = self._tensors(self.plan(some, table))
        self.tokenizer = tokenizer_bytes(source)
        # bytes no choice changes: norms, rotary caches, biases, the tokenizer files; and what a step reads of them
        fixed = [(name, size) for name, size in tensors if _group_of(name) is None]
        self.fixed = sum(size for _, size in fixed) + self.tokenizer
        self.fixed_read = _read_bytes(fixed, gathered)
        # alignment pads before each large tensor: about this much (allocate checks the exact size)
        self.padding = sum(1 for _, size in tensors if size > ALIGN_THRESHOLD) * max(4096, contract.ALIGNMENT)

    def _tensors(self, plan: WeightPlan) -> tuple[list[tuple[str, int]], set[str]]:
        return _tensors(self.config, plan, self.context_length)

    def plan(self, linears: dict[str, str], table: str) -> WeightPlan:
        """The WeightPlan of a mix: candidate label per linear group, tables label."""
        return _plan(self.tables[table], {g: self.specs[label] for g, label in linears.items()})

    def _smallest_plan(self, table_cost: dict[str, int]) -> WeightPlan:
        linears = {g: min(b, key=b.get) for g, b in self.linear_bytes.items()}
        return self.plan(linears, min(table_cost, key=table_cost.get))

    def smallest(self) -> int:
        """The smallest artifact (data file and tokenizer): every group at its smallest storage."""
        return self.size(self._smallest_plan(self.table_bytes))

    def least_read(self) -> int:
        """The fewest weight bytes a decode step can read: every group at the storage read least."""
        return self.read(self._smallest_plan(self.table_read))

    def size(self, plan: WeightPlan) -> int:
        """Exact bytes of the data file `plan` exports, plus the tokenizer files."""
        return data_file_bytes(self._tensors(plan)[0]) + self.tokenizer

    def read(self, plan: WeightPlan) -> int:
        """Exact weight bytes a decode step of `plan`'s graph reads (every initializer but gathered rows)."""
        return _read_bytes(*self._tensors(plan))


def check_budget(sizer: Sizer, budget_bytes: int, read_budget_bytes: int | None = None) -> None:
    """Raise BudgetError, naming the smallest reachable size (or read), when no mix fits the budgets."""
    smallest = sizer.smallest()
    if budget_bytes < smallest:
        raise BudgetError(
            f"precision max_size_mb {budget_bytes / 1e6:g} is below the smallest artifact this model reaches "
            f"({smallest / 1e6:.3f} MB, every tensor at its smallest storage); raise max_size_mb"
        )
    if read_budget_bytes is not None:
        least = sizer.least_read()
        if read_budget_bytes < least:
            raise BudgetError(
                f"precision max_read_mb {read_budget_bytes / 1e6:g} is below the fewest bytes a decode step of "
                f"this model reads ({least / 1e6:.3f} MB, every tensor at its smallest storage); raise max_read_mb"
            )


def allocate(
    sizer: Sizer, kl: dict[str, dict[str, float]], budget_bytes: int, read_budget_bytes: int | None = None
) -> Allocation:
    """The mix of least summed predicted KL whose artifact fits `budget_bytes` and, if given, whose decode
    step reads at most `read_budget_bytes` (`kl` from sensitivity.measure)."""
    check_budget(sizer, budget_bytes, read_budget_bytes)
    groups: list[tuple[str, list[Option]]] = [
        (g, [Option(label, b, kl[g][label], b) for label, b in sizer.linear_bytes[g].items()]) for g in sizer.groups
    ]
    tables = []
    for label, b in sizer.table_bytes.items():
        emb, head = label.split("/")
        loss = kl[sensitivity.EMBEDDING][emb] + kl[sensitivity.LM_HEAD][head]
        tables.append(Option(label, b, loss, sizer.table_read[label]))
    groups.append((TABLES, tables))
    capacity = budget_bytes - sizer.fixed - sizer.padding
    for _ in range(4):  # the padding is estimated: shrink the capacity by any overshoot and choose again
        choices = _choose(
            groups, capacity, None if read_budget_bytes is None else read_budget_bytes - sizer.fixed_read
        )
        if choices is None:
            break
        plan = sizer.plan({g: choices[g].label for g in sizer.groups}, choices[TABLES].label)
        size = sizer.size(plan)
        if size <= budget_bytes:
            return Allocation(plan, choices, size, budget_bytes, sizer.read(plan), read_budget_bytes)
        capacity -= size - budget_bytes
    raise BudgetError(
        f"no mix found within {budget_bytes / 1e6:g} MB"
        + ("" if read_budget_bytes is None else f" reading at most {read_budget_bytes / 1e6:g} MB per token")
        + "; raise max_size_mb"
        + ("" if read_budget_bytes is None else " or max_read_mb")
    )


LAMBDA_STEPS = 40  # bisection steps on the price of a byte


def _choose(groups: list[tuple[str, list[Option]]], capacity: int, read_capacity: int | None) -> dict | None:
    """Each group's option: least summed loss within `capacity` bytes and (if given) `read_capacity` read
    bytes; None when no mix meets both."""
    if read_capacity is None:
        return _solve(groups, "bytes", capacity, "read", 0.0)
    limits = {"bytes": capacity, "read": read_capacity}
    # Two relaxations, each exact in one budget and pricing the other: the one whose budget binds gives the
    # better plan (exactly the optimum when the priced budget is slack at price 0)
    plans = [_relaxed(groups, exact, "read" if exact == "bytes" else "bytes", limits) for exact in limits]
    feasible = [p for p in plans if p is not None]
    return min(feasible, key=lambda c: sum(o.loss for o in c.values())) if feasible else None


def _total(choices: dict[str, Option], field: str) -> int:
    return sum(getattr(o, field) for o in choices.values())


def _solve(groups, exact: str, limit: int, priced: str, price: float) -> dict[str, Option]:
    """Least loss + `price` per unit of `priced` with summed `exact` within `limit` (dynamic programming)."""
    weights = [[getattr(o, exact) for o in opts] for _, opts in groups]
    losses = [[o.loss + price * getattr(o, priced) for o in opts] for _, opts in groups]
    return {g: opts[i] for (g, opts), i in zip(groups, _knapsack(weights, losses, limit))}


def _relaxed(groups, exact: str, priced: str, limits: dict[str, int]) -> dict[str, Option] | None:
    """The plan exact in `exact`'s budget whose `priced` total fits its budget at the smallest price
    (bisection), with what it leaves of both budgets spent by `_fill`; None when no price fits."""
    best = _solve(groups, exact, limits[exact], priced, 0.0)
    if _total(best, priced) > limits[priced]:
        # at this price one more unit outweighs any loss a plan can save: the plan using least of it
        lo, hi = 0.0, 1.0 + sum(max(o.loss for o in opts) for _, opts in groups)
        best = _solve(groups, exact, limits[exact], priced, hi)
        if _total(best, priced) > limits[priced]:
            return None
        for _ in range(LAMBDA_STEPS):
            mid = (lo + hi) / 2
            choices = _solve(groups, exact, limits[exact], priced, mid)
            if _total(choices, priced) <= limits[priced]:
                hi, best = mid, choices
            else:
                lo = mid
    return _fill(groups, best, limits["bytes"], limits["read"])


def _fill(groups: list[tuple[str, list[Option]]], choices: dict[str, Option], capacity: int, read_capacity: int):
    """Spend what a priced plan leaves of both budgets (one price cannot reach every mix): repeatedly take
    the one-group change that lowers the loss most while both budgets hold."""
    choices = dict(choices)
    while True:
        size = sum(o.bytes for o in choices.values())
        read = sum(o.read for o in choices.values())
        best = None
        for g, opts in groups:
            now = choices[g]
            for o in opts:
                fits = size - now.bytes + o.bytes <= capacity and read - now.read + o.read <= read_capacity
                if fits and o.loss < now.loss and (best is None or now.loss - o.loss > best[0]):
                    best = (now.loss - o.loss, g, o)
        if best is None:
            return choices
        choices[best[1]] = best[2]


def _knapsack(weights: list[list[int]], losses: list[list[float]], capacity: int) -> list[int]:
    """Index of the chosen option per group: least summed loss with summed weights <= capacity."""
    floor = [min(w) for w in weights]
    spread = sum(max(w) - f for w, f in zip(weights, floor))
    unit = max(1, -(-spread // UNITS))
    size = min(UNITS + len(weights), max(0, (capacity - sum(floor)) // unit)) + 1
    best = np.zeros(size)  # best[c]: least loss of the groups so far within c units
    picks = []
    for ws, ls, f in zip(weights, losses, floor):
        new = np.full(size, np.inf)
        pick = np.zeros(size, np.int16)
        for i, (weight, loss) in enumerate(zip(ws, ls)):
            w = -(-(weight - f) // unit)
            if w >= size:
                continue
            candidate = np.full(size, np.inf)
            candidate[w:] = best[: size - w] + loss
            better = candidate < new
            new[better], pick[better] = candidate[better], i
        best = new
        picks.append(pick)
    c = size - 1
    chosen = []
    for ws, f, pick in zip(reversed(weights), reversed(floor), reversed(picks)):
        i = int(pick[c])
        chosen.append(i)
        c -= -(-(ws[i] - f) // unit)
    return chosen[::-1]
