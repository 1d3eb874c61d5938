"""Markdown tables of benchmark results: the machine and date, probe cost, reducer speed,
soak, and every target with its measured number and whether it was met."""

from __future__ import annotations

from typing import Any

from attnflow.benchmarks.probe import ADVANTAGE_TARGET, METHODS
from attnflow.benchmarks.reducers import DECODE_FLOOR, SPEEDUP_TARGET


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def machine_line(m: dict[str, Any]) -> str:
    gpu = m["gpu"] or "no GPU"
    load = ", ".join(str(x) for x in m["load_average"]) if m.get("load_average") else "n/a"
    return (f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores (torch threads: {m['torch_threads']}), "
            f"{gpu}; load average at start {load}; torch {m['torch']}, transformers {m['transformers']}.")


def _table(columns: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """A markdown table; ``columns`` are (title, alignment row cell)."""
    lines = ["| " + " | ".join(t for t, _ in columns) + " |", "|" + "|".join(a for _, a in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


TEXT, NUM = "---", "---:"


def probe_table(results: list[dict[str, Any]]) -> str:
    """One row per (device, tokens, method)."""
    columns = [("device", TEXT), ("model", TEXT), ("tokens", NUM), ("method", TEXT), ("min s", NUM),
               ("median s", NUM), ("× plain (min)", NUM), ("× plain (median)", NUM), ("CPU s (min)", NUM),
               ("× plain CPU (min)", NUM), ("peak MB", NUM)]
    rows = [[r["device"], f"{r['shape']['name']} {r['dtype']}", str(r["tokens"]), METHODS[name],
             _f(row["min_s"], 3), _f(row["median_s"], 3), _f(row["ratio_min"]), _f(row["ratio_median"]),
             _f(row["cpu_min_s"], 3), _f(row["cpu_ratio_min"]), _f(row.get("peak_mb"), 0)]
            for r in results for name, row in r["methods"].items()]
    return _table(columns, rows)


def reducer_table(results: list[dict[str, Any]]) -> str:
    """One row per (model, configuration)."""
    columns = [("device", TEXT), ("model", TEXT), ("tokens (visual)", NUM), ("config", TEXT),
               ("predicted FLOPs ratio", NUM), ("predicted speedup", NUM), ("predicted speedup, whole forward", NUM),
               ("prefill speedup", NUM), ("measured / predicted", NUM), ("measured / whole-forward prediction", NUM),
               ("attainable speedup", NUM), ("measured / attainable", NUM),
               ("prefill speedup (CPU time)", NUM), ("prefill min s", NUM),
               ("predicted decode speedup", NUM), ("decode speedup", NUM), ("decode ms/token (median)", NUM)]
    rows = [[r["device"], r["model"], f"{r['tokens']} ({r['visual_tokens']})", name,
             _f(row["predicted_flops_ratio"], 3), _f(row["predicted_speedup"]), _f(row.get("predicted_forward_speedup")),
             _f(row["prefill_speedup"]), _f(row.get("speedup_vs_predicted")), _f(row.get("speedup_vs_forward")),
             _f(row.get("attainable_speedup")), _f(row.get("speedup_vs_attainable")),
             _f(row["cpu_prefill_speedup"]), _f(row["prefill_min_s"], 3),
             _f(row["predicted_decode_speedup"]), _f(row["decode_speedup"]),
             _f(1000 * row["decode_median_s_per_token"], 1)]
            for r in results for name, row in r["configs"].items()]
    return _table(columns, rows)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every benchmark target (README "Benchmarks") with what was measured and whether it was met."""
    rows = []
    for r in results["probe"]:
        where = f"{r['device']}, {r['tokens']} tokens"
        rows.append({"target": f"summary recording <= {r['summary_target']['max_ratio']}x plain forward ({where})",
                     "measured": f"{r['summary_ratio']:.2f}x (median of rounds), {r['summary_ratio_min']:.2f}x "
                                 f"(min/min), {r['summary_ratio_cpu']:.2f}x (CPU time, min/min)",
                     "met": r["summary_target"]["met"]})
        if r["tokens"] >= 2400 and "advantage" in r:
            for other, adv in r["advantage"].items():
                rows.append({"target": f">= {ADVANTAGE_TARGET}x cheaper in time or memory than "
                                       f"{METHODS[other]} ({where})",
                             "measured": f"time {adv['time_x']:.2f}x (CPU time {adv['cpu_time_x']:.2f}x), "
                                         f"memory {_f(adv['memory_x'])}x",
                             "met": adv["met"]})
    for r in results["reducers"]:
        for name, row in r["configs"].items():
            if "target_met" in row:
                rows.append({"target": f"{r['model']} {name}: prefill speedup >= {SPEEDUP_TARGET} x predicted by the "
                                       f"forward's FLOPs ({r['device']})",
                             "measured": f"{row['prefill_speedup']:.2f} vs {row['predicted_forward_speedup']:.2f} "
                                         f"predicted ({row['speedup_vs_forward']:.2f}x; by the decoder layers' "
                                         f"FLOPs alone {row['predicted_speedup']:.2f}, {row['speedup_vs_predicted']:.2f}x, "
                                         f"CPU time {row['cpu_speedup_vs_predicted']:.2f}x); attainable "
                                         f"{row['attainable_speedup']:.2f} (measured / attainable "
                                         f"{row['speedup_vs_attainable']:.2f})",
                             "met": row["target_met"]})
                rows.append({"target": f"{r['model']} {name}: decode speedup >= {DECODE_FLOOR} and >= {SPEEDUP_TARGET} x "
                                       f"predicted ({r['device']})",
                             "measured": f"{row['decode_speedup']:.2f} vs {row['predicted_decode_speedup']:.2f} "
                                         f"predicted ({row['decode_vs_predicted']:.2f}x)",
                             "met": row["decode_target_met"]})
    soak = results["soak"]
    if soak is None:  # a --gpu-only run
        return rows
    rows.append({"target": f"soak: resident memory grows < {soak['target_percent']}% from recording "
                           f"{soak['settle']} to {soak['recordings']}",
                 "measured": f"{soak['growth_percent']:.2f}%", "met": soak["target_met"]})
    return rows


def _soak(soak: dict[str, Any]) -> list[str]:
    return ["## Soak", "",
            f"{soak['recordings']} recordings of {soak['examples_per_recording']} prompts ({soak['model']}) in "
            f"{soak['seconds']:.0f} s: resident set {soak['rss_mb_after_settle']:.1f} MB after {soak['settle']}, "
            f"{soak['rss_mb_after_all']:.1f} MB after {soak['recordings']} ({soak['growth_percent']:+.2f}%, "
            f"{soak['growth_kb_per_recording']:.2f} kB per recording).", ""]


def markdown(results: dict[str, Any]) -> str:
    """The whole results page."""
    soak = results["soak"]
    parts = [
        "# attnflow benchmarks", "", machine_line(results["machine"]), "",
        f"Command: `{results['command']}` ({results['seconds']:.0f} s). {results['method']}", "",
        "## Targets", "", "| target | measured | met |", "|---|---|---|",
        *[f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in results["targets"]], "",
        "## Probe cost", "", probe_table(results["probe"]), "",
        "## Reducer speed", "", reducer_table(results["reducers"]), "",
        *(_soak(soak) if soak else []),
        "## GPU", "", results["gpu"], "",
    ]
    if results.get("notes"):
        parts += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(parts)
