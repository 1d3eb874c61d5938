"""The report's content as plain data (sentences, tables, figure references) for the typst
template: the template lays it out and never interprets it, so text from the files (token
strings, paths, commands) reaches the PDF as text, never as markup.

Shape: ``{title, subtitle, findings: [{head, text}], actions: [str], sections: [{title,
paragraphs, figures: [{path, caption, skipped}], tables: [{caption, columns, rows}],
skipped}]}``; every table cell is a string.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
from typing import Any

from attnflow.reports import words
from attnflow.reports.rundir import Run

PACKAGES = ("attnflow", "torch", "transformers", "nnsight", "numpy", "xarray", "matplotlib", "seaborn", "typst")


def _table(caption: str, columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"caption": caption, "columns": columns, "rows": [[words.num(c) for c in row] for row in rows]}


def _figure(figures: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    entry = figures[name]
    return {"path": f"/figures/{entry['file']}" if entry["file"] else None, "caption": entry["caption"],
            "skipped": entry["skipped"]}


def _section(title: str, paragraphs: list[str], figures: list[dict[str, Any]] = (),
             tables: list[dict[str, Any]] = (), skipped: str | None = None) -> dict[str, Any]:
    return {"title": title, "paragraphs": paragraphs, "figures": list(figures), "tables": list(tables),
            "skipped": skipped}


def _has_visual(run: Run) -> bool:
    return bool((run.trace["modality"] == "visual").any())


def flow_section(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    flow = run.findings["flow"]
    paragraphs = ["Each row is a layer; each column the share of a query group's attention that lands "
                  "on a key group (rows of a query group sum to one)."]
    tables = []
    attribution = flow.get("attribution")
    if attribution:
        roll, mflow = attribution["rollout"]["by_modality"], attribution["maxflow"]["by_modality"]
        groups = [g for g in roll if roll[g] or mflow.get(g)]
        tables.append(_table(f"Attribution of the last prompt position to the input tokens "
                             f"(mean over {attribution['samples']} samples; max-flow: "
                             f"{attribution['maxflow']['note']})",
                             ["method", *groups],
                             [["attention rollout", *[roll[g] for g in groups]],
                              ["attention flow (max-flow)", *[mflow[g] for g in groups]]]))
    elif flow.get("attribution_note"):
        paragraphs.append(f"Rollout and attention flow were not computed: {flow['attribution_note']}.")
    return _section("Attention flow", paragraphs, [_figure(figures, "flow")], tables)


def sinks_section(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sinks = run.findings["sinks"]
    th = run.findings["thresholds"]
    paragraphs = [words.sinks_sentence(run.findings),
                  f"A key is a sink in a layer when some head gives it at least {th['sink_ratio']:g}× what "
                  f"uniform attention would (the causal-mask-corrected baseline) and at least "
                  f"{words.pct(th['sink_share'])} of its attention, in at least {words.pct(th['sink_frequency'])} "
                  "of the samples."]
    rows = [[t["layer"], t["pos"], t["token"], t["modality"], words.pct(t["share"], 1),
             f"{t.get('ratio', float('nan')):.2f}×", words.pct(t["frequency"]),
             ", ".join(map(str, t.get("heads", [])))] for t in sinks["tokens"]]
    tables = [_table("Attention sinks per layer", ["layer", "pos", "token", "modality", "share", "vs uniform",
                                                   "samples", "heads"], rows)] if rows else []
    return _section("Attention sinks", paragraphs, [_figure(figures, "received"), _figure(figures, "sink_heads")],
                    tables)


def patches_section(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if not _has_visual(run):
        return _section("Attention on the image", [], skipped=figures["patches"]["skipped"])
    visual = run.findings["sinks"].get("visual", [])
    rows = [[v["layer"], v["pos"], v["token"], " and ".join(v["by"]), words.pct(v["frequency"])] for v in visual]
    tables = [_table("Visual sinks", ["layer", "pos", "token", "found by", "samples"], rows)] if rows else []
    return _section("Attention on the image", [words.visual_sinks_sentence(run.findings)],
                    [_figure(figures, "patches")], tables)


def massive_section(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    massive = run.findings["sinks"]["massive"]
    rows = [[m["layer"], m["pos"], m["token"], m["modality"], m["dim"], f"{m['ratio']:.0f}×",
             words.pct(m["frequency"])] for m in massive]
    tables = [_table("Massive activations", ["layer", "pos", "token", "modality", "dim", "max / median",
                                             "samples"], rows)] if rows else []
    return _section("Massive activations", [words.massive_sentence(run.findings)],
                    [_figure(figures, "massive")], tables)


def redundancy_section(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    red = run.findings["redundancy"]
    bi = red["block_influence"]
    angular = red["angular_distance"][0] if red.get("angular_distance") else [None] * len(bi["all"])
    rank = red.get("attention_rank") or [None] * len(bi["all"])
    rows = [[layer, bi["all"][layer], bi["text"][layer], bi["visual"][layer], angular[layer], rank[layer],
             "yes" if layer in red["candidates"] else ""] for layer in range(len(bi["all"]))]
    return _section("Redundant layers", [words.redundancy_sentence(run.findings)], [_figure(figures, "redundancy")],
                    [_table("Redundancy per layer (Block Influence = 1 − mean cos(input, output); angular "
                            "distance to the next layer's input, last token; attention rank)",
                            ["layer", "BI all", "BI text", "BI visual", "angular d(ℓ, ℓ+1)", "ARank", "candidate"],
                            rows)])


def exit_section(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ex = run.findings["exit"]
    if not ex["applies"]:
        return _section("Exit points", [], skipped=ex.get("reason", "no visual tokens"))
    rows = [[name.replace("_", " "), info["layer"], info["tolerance"], info.get("rule", ""),
             "chosen" if name == ex["criterion"] else ""] for name, info in ex["layers"].items()]
    tables = [_table("Exit layer by criterion", ["criterion", "exit layer", "tolerance", "rule", ""], rows)]
    by_qtype = (ex["layers"].get("knockout") or {}).get("by_qtype") or {}
    if by_qtype:
        tables.append(_table("Knockout exit layer per question type", ["question type", "exit layer"],
                             [[q, layer] for q, layer in sorted(by_qtype.items())]))
    paragraphs = [words.exit_sentence(run.findings), *ex.get("notes", [])]
    return _section("Exit points", paragraphs, [_figure(figures, "exit")], tables)


def schedule_section(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    schedule = run.schedule
    if schedule is None:
        return _section("Schedule", [], skipped=run.why_missing("schedule", "schedule.json"))
    rows = [[k + 1, s["op"], s.get("layer", ", ".join(map(str, s.get("layers", [])))),
             words.pct(s["keep"]) if "keep" in s else "", words.step_words(s)] for k, s in enumerate(schedule["steps"])]
    protect = schedule["protect"]
    paragraphs = [words.schedule_sentence(schedule), words.verified_sentence(schedule),
                  *filter(None, [words.in_sample_sentence(schedule)]),
                  "Only visual tokens are ever removed"
                  + (f", and never visual tokens {', '.join(map(str, protect['visual_sinks']))} (visual sinks)"
                     if protect["visual_sinks"] else "") + "."]
    derived = schedule.get("derived_from") or {}
    if derived.get("budget"):
        budget = ", ".join(f"{k} {words.num(v)}" for k, v in derived["budget"].items())
        paragraphs.append(f"Fidelity budget: {budget}.")
    tables = [_table("Schedule steps", ["step", "op", "layer(s)", "keep", "meaning"], rows)] if rows else []
    if derived.get("reasons"):
        tables.append(_table("How the schedule was derived (reducers.derive)", ["", "evidence and choice"],
                             [[k + 1, str(r)] for k, r in enumerate(derived["reasons"])]))
    if derived.get("trials"):
        tables.append(_table("Candidates tried on the inputs", ["steps", "KL", "agreement", "within budget"],
                             [[words.steps_short(t["steps"]), t["kl"], words.pct(t["agreement"], 1),
                               "yes" if t["within_budget"] else "no"] for t in derived["trials"]]))
    numbers = {**{f"predicted {k}": v for k, v in (schedule.get("predicted") or {}).items()},
               **{f"verified {k}": v for k, v in (schedule.get("verified") or {}).items()}}
    if numbers:
        tables.append(_table("Predicted and verified", ["quantity", "value"], [[k.replace("_", " "), v]
                                                                             for k, v in numbers.items()]))
    return _section("Schedule", paragraphs, [_figure(figures, "schedule")], tables)


def verification_section(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    verdict = run.verdict
    if verdict is None:
        return _section("Verification against the baselines", [], skipped=run.why_missing("verify", "verdict.json"))
    rows, full = verdict["rows"], verdict["unreduced"]
    paragraphs = [words.verdict_sentence(verdict),
                  f"Measured on {verdict['n_examples']} prompts with {verdict['new_tokens']} greedy tokens each, on "
                  f"{verdict['device']} ({verdict['backend']}, {verdict['dtype']}); wall-clock times are medians of "
                  f"{verdict['repeats']} interleaved repeats on a batch of {verdict['timing_batch']} and on the first "
                  "prompt alone (B=1), in one process. "
                  "FLOPs are the cost model's prediction for the prefill's decoder layers; forward FLOPs add the "
                  "schedule's own scoring (DivPrune's pairwise distances, recycling's clustering) and what lies "
                  "outside the layers (vision tower, projector, unembedding), which no schedule cuts: the "
                  "prefill speedup its FLOPs predict is 1 / forward FLOPs. \"vs schedule\" bounds each row's accuracy "
                  "minus the schedule's at 95% on each side, paired prompt by prompt (Tango's interval): an interval "
                  "that holds 0 is a gap these prompts cannot tell from noise."]
    fidelity = _table("Pareto table: fidelity against the unreduced model",
                      ["configuration", "steps", "FLOPs", "T_eq", "agreement", "KL", "gen. agr.", "accuracy", "Δ acc.",
                       "vs schedule", "Pareto"],
                      [[words.config_name(r["name"]), words.steps_short(r["steps"]), words.pct(r["flops_ratio"], 1),
                        f"{r['visual_tokens_equivalent']:.1f}", words.pct(r["agreement"], 1), r["kl"],
                        words.pct(r["generation_agreement"], 1), words.pct(r["accuracy"], 1),
                        "n/a" if r["accuracy_delta"] is None else f"{100 * r['accuracy_delta']:+.1f}",
                        words.gap(r.get("versus_schedule")) if r["name"] != "schedule" else "",
                        "yes" if r["pareto"] else ""] for r in rows])
    speed = _table("Cost and measured speed",
                   ["configuration", "FLOPs", "forward FLOPs", "KV cache", "prefill ms", "prefill ×", "decode ms/token",
                    "decode ×", "prefill × B=1", "decode × B=1"],
                   [["unreduced model", "100%", "100%", "100%", full["prefill_ms"], "1.00", full["decode_ms_per_token"],
                     "1.00", "1.00", "1.00"]]
                   + [[words.config_name(r["name"]), words.pct(r["flops_ratio"], 1),
                       words.pct(r.get("forward_flops_ratio"), 1),
                       words.pct(r["kv_bytes_ratio"], 1), r["prefill_ms"], words.times(r["prefill_speedup"]),
                       r["decode_ms_per_token"],
                       words.times(r["decode_speedup"]), words.times(r.get("prefill_speedup_b1")),
                       words.times(r.get("decode_speedup_b1"))] for r in rows])
    tables = [fidelity, speed]
    types = sorted(full.get("accuracy_by_type") or {})
    if types:
        tables.append(_table("Accuracy per question type", ["question type", "unreduced",
                                                            *[words.config_name(r["name"]) for r in rows]],
                             [[q, words.pct(full["accuracy_by_type"][q], 1),
                               *[words.pct(r["accuracy_by_type"].get(q), 1) for r in rows]] for q in types]))
    return _section("Verification against the baselines", paragraphs, [_figure(figures, "pareto")], tables)


def provenance_section(run: Run) -> dict[str, Any]:
    attrs = run.trace.attrs
    meta = run.meta or {}
    command = meta.get("command")
    if isinstance(command, list):
        command = " ".join(map(str, command))
    rows = [["model", attrs.get("model_path") or "(not recorded)"], ["model type", attrs.get("model_type")],
            ["config fingerprint", attrs.get("fingerprint")],
            ["layers × heads", f"{attrs.get('num_layers')} × {attrs.get('num_heads')}"],
            ["attention", f"{attrs.get('attn_implementation')}, {attrs.get('dtype')}"],
            ["trace", f"schema {attrs.get('attnflow_trace')}, level {attrs.get('level')}, "
                      f"{run.trace.sizes['sample']} samples"],
            ["inputs", attrs.get("inputs_path") or "(in memory)"], ["inputs sha256", attrs.get("inputs_sha256") or ""],
            ["command", command or "(no run.json: not recorded)"],
            *[[f"{stage} (s)", seconds] for stage, seconds in (meta.get("seconds") or {}).items()],
            *[[key, value] for key, value in (meta.get("machine") or {}).items() if value not in ("", None)],
            ["report built", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]]
    versions = meta.get("versions") or {p: _version(p) for p in PACKAGES}
    source = "of the run" if meta.get("versions") else "at report time"
    versions = {**versions, **({"python": platform.python_version()} if "python" not in versions else {})}
    thresholds = run.findings["thresholds"]
    return _section("Provenance", [], tables=[
        _table("Run", ["item", "value"], rows),
        _table(f"Versions {source}", ["package", "version"], [[k, v] for k, v in versions.items()]),
        _table("Analysis thresholds (findings.json)", ["threshold", "value"], [[k, v] for k, v in thresholds.items()])])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def actions(run: Run) -> list[str]:
    """What to do about the findings, most useful first."""
    out = []
    schedule = run.schedule
    if schedule and schedule["steps"]:
        out.append("Run the model under the derived schedule: `with attnflow.reducers.apply(model, "
                   "\"schedule.json\"): model.generate(...)` (forward and generate, KV cache included).")
    groups = words.sink_groups(run.findings["sinks"]["tokens"])
    if groups:
        names = ", ".join(f"“{g['token']}” (position {g['pos']})" for g in groups[:4])
        out.append(f"Never prune or evict the sink token{'s' if len(groups) > 1 else ''} {names}: heads park "
                   "attention there, and removing a sink changes every later layer.")
    ex = run.findings["exit"]
    if ex["applies"] and ex["layer"] is not None and 0 < ex["layer"] < run.findings["model"]["num_layers"]:
        tol = ex["layers"][ex["criterion"]]["tolerance"]
        why = (f"cutting them from layer {ex['layer'] - 1} on changed the output by more than the tolerance ({tol:g})"
               if ex["criterion"] == "knockout" else
               "text attention to them has faded by then (observational only: pass the model to "
               "attnflow analyze for the causal knockout check)")
        out.append(f"Let visual tokens leave at layer {ex['layer']}, not earlier: {why}.")
    verified = (schedule or {}).get("verified") or {}
    if verified.get("within_budget") is False:
        out.append("The derived schedule passed validation but is outside its fidelity budget on the verification "
                   "prompts: use it only after checking the verification tables, or derive again on more prompts "
                   "or with a looser budget.")
    if not _has_visual(run):
        out.append("This model saw no visual tokens: the visual-token reductions do not apply; layer skipping "
                   "of redundant layers is the reduction to try.")
    candidates = run.findings["redundancy"]["candidates"]
    if candidates:
        out.append(f"Try skipping layer{'s' if len(candidates) > 1 else ''} {', '.join(map(str, candidates[:4]))} "
                   "and check the output with attnflow verify.")
    if not out:
        out.append("Nothing to act on: no sinks, no exit point before the last layer and no redundant layer.")
    return out


def report_data(run: Run, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the template shows; ``figures`` is the figures index (see figures.py)."""
    attrs = run.trace.attrs
    model = attrs.get("model_path") or attrs.get("model_type")
    findings = [{"head": "Attention sinks", "text": words.sinks_sentence(run.findings)},
                {"head": "Massive activations", "text": words.massive_sentence(run.findings)},
                {"head": "Exit point", "text": words.exit_sentence(run.findings)},
                {"head": "Redundant layers", "text": words.redundancy_sentence(run.findings)},
                {"head": "Schedule", "text": words.schedule_sentence(run.schedule)
                 + (" " + words.verified_sentence(run.schedule) if run.schedule else "")},
                {"head": "Baselines", "text": words.verdict_sentence(run.verdict)}]
    sections = [flow_section(run, figures), sinks_section(run, figures), patches_section(run, figures),
                massive_section(run, figures), redundancy_section(run, figures), exit_section(run, figures),
                schedule_section(run, figures), verification_section(run, figures), provenance_section(run)]
    return {"title": f"attnflow report: {model}",
            "subtitle": f"{attrs.get('model_type')} · {attrs.get('num_layers')} layers · "
                        f"{run.trace.sizes['sample']} samples · {attrs.get('fingerprint', '')[:19]}…",
            "findings": findings, "actions": actions(run), "sections": sections}
