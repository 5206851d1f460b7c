"""Pure parts of the benchmark harness: statistics, run order, fidelity aggregation, targets, table.

Nothing here runs a model; `benchmarks/run.py` feeds it measurements.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping, Sequence


def spread(values: Iterable[float | None]) -> dict | None:
    """Median, min, max and count of the non-missing values (None when there are none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def interleave(systems: Sequence[str], scenarios: Sequence[str], reps: int) -> list[tuple[int, str, str]]:
    """Round-robin order (rep, scenario, system): every system once per scenario before any repeats."""
    return [(rep, scenario, system) for rep in range(reps) for scenario in scenarios for system in systems]


def combine_fidelity(per_text: Mapping[str, tuple[Mapping[str, float], int]]) -> dict:
    """Token-weighted overall metrics from {name: (edge.check.fidelity.compare result, positions)}.

    Top-1 and KL are per-position means (weight: positions); perplexity is exp of the mean next-token
    NLL (weight: positions - 1 targets).
    """
    positions = sum(n for _, n in per_text.values())
    targets = sum(n - 1 for _, n in per_text.values())
    if positions == 0 or targets <= 0:
        raise ValueError("no positions to combine")
    out = {k: sum(m[k] * n for m, n in per_text.values()) / positions for k in ("top1_agreement", "mean_kl")}
    for k in ("ppl_reference", "ppl_artifact"):
        out[k] = math.exp(sum(math.log(m[k]) * (n - 1) for m, n in per_text.values()) / targets)
    out["tokens"] = positions
    return out


def greedy_prefix(artifact_argmax: Sequence[int], reference_tokens: Sequence[int]) -> int:
    """How many of the reference's greedy tokens the artifact reproduces before the first difference."""
    for k, (a, r) in enumerate(zip(artifact_argmax, reference_tokens)):
        if a != r:
            return k
    return min(len(artifact_argmax), len(reference_tokens))


# (key, description, our metric, their system group, comparison, limit)
# "le": ours <= limit x theirs; "ge": ours >= limit x theirs; "abs_ge": ours >= limit (no anchor).
TARGETS = (
    ("decode", "decode tok/s >= 1.0x llama.cpp", "decode_tps", "llamacpp", "ge", 1.0),
    ("ttft512", "TTFT 512-token prompt <= 0.5x genai", "ttft_512_ms", "genai", "le", 0.5),
    ("size", "artifact size <= 0.55x genai", "artifact_mb", "genai", "le", 0.55),
    ("rss", "peak RSS generating (chat prompt) <= 1.0x genai", "peak_rss_mb", "genai", "le", 1.0),
    ("rss512", "peak RSS generating (512-token prompt) <= 1.0x genai", "peak_rss_512_mb", "genai", "le", 1.0),
    ("kl", "mean KL vs fp32 <= 0.5x genai", "mean_kl", "genai", "le", 0.5),
    ("top1", "top-1 agreement >= 0.90", "top1_agreement", None, "abs_ge", 0.90),
    ("build_rss", "build peak RSS <= 0.25x genai builder", "build_peak_rss_mb", "genai", "le", 0.25),
)


def evaluate_targets(
    rows: Mapping[str, Mapping[str, float | None]], ours: str, anchors: Mapping[str, str | None]
) -> list[dict]:
    """Each target as {key, target, ours, theirs, ratio, met}; `anchors` maps a group to the system
    measured for it in this run (None: not in the run, so the target is reported as not measured)."""
    out = []
    mine = rows.get(ours, {})
    for key, text, metric, group, op, limit in TARGETS:
        entry = {
            "key": key,
            "target": text,
            "system": ours,
            "group": group,
            "anchor": None,
            "ours": mine.get(metric),
            "theirs": None,
            "ratio": None,
            "met": None,
        }
        if op == "abs_ge":
            if entry["ours"] is not None:
                entry["met"] = entry["ours"] >= limit
            out.append(entry)
            continue
        anchor = anchors.get(group)
        theirs = rows.get(anchor, {}).get(metric) if anchor else None
        entry.update(anchor=anchor, theirs=theirs)
        if entry["ours"] is not None and theirs:
            entry["ratio"] = entry["ours"] / theirs
            entry["met"] = entry["ratio"] >= limit if op == "ge" else entry["ratio"] <= limit
        out.append(entry)
    return out


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):  # a spread
        mid = _cell(value["median"], digits)
        return mid if value["n"] < 2 else f"{mid} ({_cell(value['min'], digits)}–{_cell(value['max'], digits)})"
    return f"{value:,.{digits}f}"


COLUMNS = (  # (header, row key, digits)
    ("artifact MB", "artifact_mb", 0),
    ("build s", "build_s", 0),
    ("build peak RSS MB", "build_peak_rss_mb", 0),
    ("TTFT chat ms", "ttft_chat", 0),
    ("TTFT 512 ms", "ttft_512", 0),
    ("TTFT 1500 ms", "ttft_1500", 0),
    ("prefill tok/s (512)", "prefill_512", 1),
    ("decode tok/s", "decode", 2),
    ("peak RSS MB", "rss_chat", 0),
    ("top-1", "top1_agreement", 3),
    ("mean KL", "mean_kl", 4),
    ("ppl (ref)", "ppl", 2),
    ("greedy 32 match", "greedy_match", 2),
    ("task pass %", "task_pass", 1),
    ("HumanEval %", "humaneval_pass", 1),
)


def render_table(rows: Mapping[str, Mapping]) -> str:
    """Markdown table, one row per system; speed cells show median (min–max) over repetitions."""
    lines = ["| system | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, row in rows.items():
        cells = []
        for _, key, digits in COLUMNS:
            if key == "ppl":
                art, ref = row.get("ppl_artifact"), row.get("ppl_reference")
                cells.append("—" if art is None else f"{art:.2f} ({ref:.2f})")
            else:
                cells.append(_cell(row.get(key), digits))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def divergence(replies: Mapping[str, Sequence[int]], reference: Mapping[str, Sequence[int]]) -> dict:
    """How closely a system's greedy replies (new token ids by item) follow the reference's: the items whose
    reply is the reference's token for token, and how often a reply leaves the reference's path per 1,000
    tokens it decided while on it (the maximum-likelihood estimate of a constant per-token rate: replies
    that left, over the decisions made on the path, the one that left it included). A pass rate moves only
    where a reply leaves the path; this rate counts every such event, not just the ones that flip a grade."""
    same = left = decided = 0
    for name, ref in reference.items():
        mine = list(replies[name])
        if mine == list(ref):
            same, decided = same + 1, decided + len(ref)
            continue
        first = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
        left, decided = left + 1, decided + first + 1
    return {"items": len(reference), "identical": same, "per_1k_tokens": 1000 * left / decided if decided else 0.0}


def render_task_rates(result: Mapping, reference: str | None = None) -> str:
    """Markdown table of a task-rate result (edge.check.tasks.run's): one row per suite and overall, one
    column per side (the systems and the fp32 reference), pass rates in percent; with `reference`, a row of
    the items each side passes that the reference fails (+) and fails that it passes (-), and one of its
    change in points with a 95 % interval (`edge.check.tasks.paired_change`); with a ``divergence`` entry
    ({side: `divergence`}), rows of identical replies and of departures from the reference's path."""
    from edge.check.tasks import paired_change

    rows = [*result["suites"].items(), ("overall", result["overall"])]
    sides = [k for k in result["overall"] if k != "items"]
    lines = ["| suite | items | " + " | ".join(sides) + " |", "|---|---:|" + "---:|" * len(sides)]
    for name, row in rows:
        lines.append(f"| {name} | {row['items']} | " + " | ".join(f"{100 * row[s]:.1f}" for s in sides) + " |")
    if reference in sides:
        outcomes = [o for items in result["items"].values() for o in items.values()]
        changes = {s: paired_change(result, s, reference) for s in sides if s != reference}
        counts = [f"+{c.gained} / -{c.lost}" if (c := changes.get(s)) else "" for s in sides]
        points = [
            f"{100 * c.change:+.1f} ({100 * c.low:+.1f} to {100 * c.high:+.1f})" if (c := changes.get(s)) else ""
            for s in sides
        ]
        lines.append(f"| items vs {reference} | {len(outcomes)} | " + " | ".join(counts) + " |")
        lines.append(f"| points vs {reference} (95 % interval) | | " + " | ".join(points) + " |")
    paths = result.get("divergence") or {}
    if paths:
        n = next(iter(paths.values()))["items"]
        same = [str(paths[s]["identical"]) if s in paths else "" for s in sides]
        rate = [f"{paths[s]['per_1k_tokens']:.2f}" if s in paths else "" for s in sides]
        lines.append(f"| replies identical to {reference}'s | {n} | " + " | ".join(same) + " |")
        lines.append(f"| leaves {reference}'s path, per 1k tokens | | " + " | ".join(rate) + " |")
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4g}"


def render_targets(targets: Sequence[Mapping]) -> str:
    """Markdown list: each target met / missed / not measured, with both numbers and the ratio."""
    lines = []
    for t in targets:
        state = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        if t["group"] is None and t["ours"] is not None:
            detail = f"{t['system']} {t['ours']:.3f}"
        elif t["ratio"] is not None:
            detail = f"{t['system']} {_num(t['ours'])} vs {t['anchor']} {_num(t['theirs'])} = {t['ratio']:.2f}x"
        else:
            detail = f"needs {t['system']} and a {t['group'] or 'reference'} system in the run"
        lines.append(f"- {t['target']}: {state} ({detail})")
    return "\n".join(lines)


# -- speculative decoding (`run.py --speculation`) --------------------------------------------------

# (target, ours, theirs, limit): on the code-editing task, ours / theirs decode tok/s >= limit
SPEC_TARGETS = (
    ("lookup >= 2x our plain decode", "qwen-edge-lookup", "qwen-edge", 2.0),
    ("lookup >= 1.5x llama.cpp prompt lookup", "qwen-edge-lookup", "llamacpp-lookup", 1.5),
    ("lookup >= 1.0x llama.cpp plain", "qwen-edge-lookup", "llamacpp", 1.0),
)


def speculation_rows(runs: Sequence[Mapping]) -> dict:
    """{task: {system: {decode, ttft, acceptance, rss}}} spreads from the runs of `run.py --speculation`."""
    rows: dict = {}
    for r in runs:
        rows.setdefault(r["task"], {}).setdefault(r["system"], []).append(r["result"])
    return {
        task: {
            system: {
                "decode": spread(x.get("decode_tps") for x in results),
                "ttft": spread(x.get("ttft_ms") for x in results),
                "acceptance": spread(x.get("acceptance_rate") for x in results),
                "rss": spread(x.get("peak_rss_mb") for x in results),
            }
            for system, results in systems.items()
        }
        for task, systems in rows.items()
    }


def speculation_targets(rows: Mapping, task: str = "code-edit") -> list[dict]:
    """The speculation targets on one task: both medians and their ratio (None when a side is missing)."""
    out = []
    for name, ours, theirs, limit in SPEC_TARGETS:
        a = (rows.get(task, {}).get(ours) or {}).get("decode")
        b = (rows.get(task, {}).get(theirs) or {}).get("decode")
        ratio = a["median"] / b["median"] if a and b and b["median"] else None
        out.append(
            {
                "target": name,
                "ours": ours,
                "theirs": theirs,
                "ratio": ratio,
                "met": None if ratio is None else ratio >= limit,
            }
        )
    return out


def render_speculation(rows: Mapping, targets: Sequence[Mapping]) -> str:
    """Markdown: one table row per task and system (decode tok/s median (min–max), acceptance, TTFT), then targets."""
    lines = ["| task | system | decode tok/s | acceptance | TTFT ms | peak RSS MB |", "|---|---|---:|---:|---:|---:|"]
    for task, systems in rows.items():
        for system, row in systems.items():
            cells = [_cell(row["decode"], 1), _cell(row["acceptance"], 2), _cell(row["ttft"], 0), _cell(row["rss"], 0)]
            lines.append(f"| {task} | {system} | " + " | ".join(cells) + " |")
    lines.append("")
    for t in targets:
        state = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        ratio = "" if t["ratio"] is None else f" ({t['ours']} / {t['theirs']} = {t['ratio']:.2f}x)"
        lines.append(f"- code-edit, {t['target']}: {state}{ratio}")
    return "\n".join(lines)
