"""What a run found and what to do about it, in sentences: one function per finding.

Every sentence is made from the numbers in findings.json, schedule.json and verdict.json,
so the report's first page says in words exactly what the files hold.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def pct(x: float | None, digits: int = 0) -> str:
    """0.421 -> '42%'; None -> 'n/a'."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def num(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; None -> 'n/a'; others as text."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int) or (x.is_integer() and abs(x) < 1e6):
        return str(int(x))
    return f"{x:.{digits}g}"


def times(x: float | None) -> str:
    """A ratio such as a speedup: 1.234 -> '1.23'; None (not measurable) -> 'n/a'."""
    return "n/a" if x is None else f"{x:.2f}"


def gap(bounds: list[float] | None) -> str:
    """Bounds on an accuracy gap in points: [-0.006, 0.011] -> '-0.6 to +1.1'; None -> 'n/a'."""
    return "n/a" if bounds is None else f"{100 * bounds[0]:+.1f} to {100 * bounds[1]:+.1f}"


def layer_list(layers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1–3, 5'."""
    out, run = [], []
    for layer in sorted(set(layers)):
        if run and layer != run[-1] + 1:
            out.append(run)
            run = []
        run.append(layer)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in out)


def sink_groups(tokens: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sinks grouped per (position, token): the layers where each is a sink and its strongest
    numbers, strongest first."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for t in tokens:
        groups[(t["pos"], t["token"], t["modality"])].append(t)
    out = [{"pos": pos, "token": token, "modality": mod, "layers": sorted(t["layer"] for t in ts),
            "share": max(t["share"] for t in ts), "ratio": max(t.get("ratio", 0.0) for t in ts),
            "frequency": max(t["frequency"] for t in ts)} for (pos, token, mod), ts in groups.items()]
    return sorted(out, key=lambda g: -g["ratio"])


def sinks_sentence(findings: dict[str, Any]) -> str:
    """The attention sinks, where and how strong, or that there are none (with the rule)."""
    groups = sink_groups(findings["sinks"]["tokens"])
    th = findings["thresholds"]
    if not groups:
        return (f"No attention sinks: no key received at least {th['sink_ratio']:g}× its uniform-attention "
                f"share and {pct(th['sink_share'])} of a head's attention in {pct(th['sink_frequency'])} "
                "or more of the samples.")
    parts = [f"“{g['token']}” (position {g['pos']}, {g['modality']}) in layer{'s' if len(g['layers']) > 1 else ''} "
             f"{layer_list(g['layers'])}, up to {g['ratio']:.1f}× its uniform share "
             f"({pct(g['share'])} of a head's attention, in {pct(g['frequency'])} of samples)"
             for g in groups[:4]]
    more = f"; and {len(groups) - 4} more (see the table)" if len(groups) > 4 else ""
    return f"{len(groups)} attention sink{'s' if len(groups) > 1 else ''}: " + "; ".join(parts) + more + "."


def massive_sentence(findings: dict[str, Any]) -> str:
    """Massive activations and the dimensions they sit in, or that there are none."""
    dims, massive = findings["sinks"]["dims"], findings["sinks"]["massive"]
    th = findings["thresholds"]
    if not dims:
        return (f"No massive activations: no hidden state has an entry {th['massive_ratio']:g}× its median "
                "(small models often have none).")
    where = sorted({(m["token"], m["modality"]) for m in massive})
    on = ", ".join(f"“{t}” ({mod})" for t, mod in where[:4])
    return (f"Massive activations in hidden dimension{'s' if len(dims) > 1 else ''} {', '.join(map(str, dims[:8]))}"
            + (f", on {on}" if on else "") + ".")


def visual_sinks_sentence(findings: dict[str, Any]) -> str:
    """Visual tokens that act as sinks (they carry no image content and should be kept)."""
    visual = findings["sinks"].get("visual", [])
    if not visual:
        return "No visual sinks: no visual token draws sink-level attention or a massive activation."
    positions = sorted({v["pos"] for v in visual})
    return (f"{len(positions)} visual sink position{'s' if len(positions) > 1 else ''} "
            f"({', '.join(map(str, positions[:8]))}): keep them out of attention-based ranking.")


def redundancy_sentence(findings: dict[str, Any]) -> str:
    """The layers that change their input least, or that none is below the threshold."""
    red, th = findings["redundancy"], findings["thresholds"]["redundant_bi"]
    bi = red["block_influence"]["all"]
    if not red["candidates"]:
        lowest = min((v, i) for i, v in enumerate(bi) if v is not None)
        return (f"No redundant layer: every layer's Block Influence exceeds {th:g} "
                f"(lowest: layer {lowest[1]}, {lowest[0]:.3f}).")
    cands = red["candidates"]
    return (f"Layer{'s' if len(cands) > 1 else ''} {', '.join(map(str, cands))} change their input least "
            f"(Block Influence ≤ {th:g}, most redundant first): candidates to skip.")


def exit_sentence(findings: dict[str, Any]) -> str:
    """The exit layer by the chosen criterion, the other criteria, or why it does not apply."""
    ex = findings["exit"]
    if not ex["applies"]:
        return f"Exit analysis does not apply: {ex.get('reason', 'no visual tokens')}."
    num_layers = findings["model"]["num_layers"]
    chosen = ex["layers"][ex["criterion"]]
    if ex["layer"] >= num_layers:
        head = (f"Visual tokens matter up to the last layer (exit layer {ex['layer']} of {num_layers}, "
                f"by {ex['criterion']}): no layer can drop them all.")
    else:
        head = (f"Exit layer {ex['layer']} of {num_layers} (by {ex['criterion'].replace('_', ' ')}, "
                f"tolerance {chosen['tolerance']:g}): from layer {ex['layer']} on, visual tokens can go.")
    others = [f"{k.replace('_', ' ')} says {v['layer']}" for k, v in ex["layers"].items() if k != ex["criterion"]]
    return head + (f" Other criteria: {'; '.join(others)}." if others else "")


RANKED_BY = {"last_row": "ranked by the last position's attention, FastV-style",
             "random": "chosen at random, seeded", "pool": "a spatially uniform subset (pooling)",
             "divprune": "the most diverse, DivPrune-style", "dart": "the least duplicated, DART-style",
             "cls": "most attended by the vision tower's [CLS], VisionZip-style",
             "text": "most attended by the prompt's relevant text tokens, SparseVLM-style"}
STEP_FLAGS = {"merge": "contextual merge", "recycle": "recycling", "proportional": "proportional attention"}


def flag_words(step: dict[str, Any]) -> list[str]:
    """What a prune step does besides dropping: VisionZip's merge, SparseVLM's recycling, ToMe's proportional attention."""
    return [words for key, words in STEP_FLAGS.items() if step.get(key)]


def step_words(step: dict[str, Any]) -> str:
    """One schedule step in words."""
    if step["op"] == "prune_visual":
        where = "before the first decoder layer" if step["layer"] == 0 else f"at layer {step['layer']}"
        flags = flag_words(step)
        return (f"prune visual tokens {where}, keeping {pct(step['keep'])} ({RANKED_BY[step.get('by', 'last_row')]}"
                f"{', with ' + ' and '.join(flags) if flags else ''})")
    if step["op"] == "visual_exit":
        return f"all visual tokens exit at layer {step['layer']}"
    if step["op"] == "visual_exit_dynamic":
        bound = "" if step.get("to") is None else f", at layer {step['to']} at the latest"
        return (f"each prompt's visual tokens exit after the first layer from {step['from'] - 1} on where the last "
                f"position pays them under {pct(step['threshold'], 1)} of its attention{bound}")
    who = "all tokens" if step["tokens"] == "all" else "visual tokens"
    many = len(step["layers"]) > 1
    return f"{who} skip layer{'s' if many else ''} {', '.join(map(str, step['layers']))}"


def schedule_sentence(schedule: dict[str, Any] | None) -> str:
    """The schedule's steps and its predicted cost, or that there is none."""
    if schedule is None:
        return "No schedule was derived (no schedule.json in the run)."
    if not schedule["steps"]:
        return "The derived schedule removes nothing: no reduction stayed within the fidelity budget."
    pred = schedule.get("predicted") or {}
    text = "Schedule: " + "; ".join(step_words(s) for s in schedule["steps"]) + "."
    if pred.get("flops_ratio") is not None:
        text += f" Predicted prefill FLOPs: {pct(pred['flops_ratio'])} of the full model"
        if pred.get("visual_tokens_equivalent") is not None:
            text += f" (T_eq {pred['visual_tokens_equivalent']:.1f} visual tokens)"
        text += "."
    return text


def verified_sentence(schedule: dict[str, Any] | None) -> str:
    """The schedule's verified fidelity and speed, or that it was not verified."""
    ver = (schedule or {}).get("verified") or {}
    if not ver:
        return "Not verified (attnflow verify)."
    where = {True: f"on {ver.get('n_examples')} held-out prompts (not used to derive it)",
             False: f"in-sample, on the {ver.get('n_examples')} prompts it was derived on"}.get(ver.get("held_out"))
    parts = []
    if ver.get("agreement") is not None:
        parts.append(f"next-token agreement {pct(ver['agreement'], 1)}")
    if ver.get("kl") is not None:
        parts.append(f"KL {num(ver['kl'])} nats")
    if ver.get("accuracy_delta") is not None:
        parts.append(f"accuracy change {100 * ver['accuracy_delta']:+.1f} points")
    if ver.get("prefill_speedup") is not None:
        predicted = ver.get("forward_flops_ratio")  # absent from schedules verified before 2026-11-28
        whole = f"; the forward's FLOPs predict {times(1 / predicted)}×" if predicted else ""
        parts.append(f"prefill speedup {times(ver.get('prefill_speedup'))}× ({ver.get('device', 'measured')}{whole})")
    budget = ((schedule or {}).get("derived_from") or {}).get("budget") or {}
    if "within_budget" in ver and budget:
        parts.append(("within" if ver["within_budget"] else "OUTSIDE") + f" the budget ({budget_words(budget)})")
    return f"Verified{' ' + where if where else ''}: " + ", ".join(parts) + "."


def in_sample_sentence(schedule: dict[str, Any] | None) -> str:
    """What derive measured on the prompts it searched (in-sample) and on its validation prompts
    (with the confidence bounds it was accepted by, and the share of answers the reduction broke,
    which the net accuracy drop nets against those it fixed), or ''."""
    derived = (schedule or {}).get("derived_from") or {}
    fid, val = derived.get("fidelity") or {}, derived.get("validation") or {}
    if not fid:
        return ""
    text = f"In-sample, on the {fid['n_examples']} prompts it was searched on: {_fidelity_words(fid)}."
    if val:
        bounds = [f"{name} {fmt(val[key])}" for key, name, fmt in (
            ("kl_upper", "KL at most", lambda v: f"{num(v)} nats"),
            ("agreement_lower", "agreement at least", lambda v: pct(v, 1)),
            ("accuracy_drop_upper", "net accuracy drop at most", lambda v: pct(v, 1)))
            if val.get(key) is not None]
        where = "the same prompts (too few to hold any out)" if val.get("in_sample") else f"{val['n_examples']} other prompts"
        churn = "" if val.get("broken_share") is None else f", answers broken {pct(val['broken_share'], 1)}"
        text += (f" Validation, on {where}: {_fidelity_words(val)}{churn}; "
                 f"{pct(val['confidence'])} bounds {', '.join(bounds)} "
                 f"({'within' if val['within_budget'] else 'OUTSIDE'} the budget).")
        text += flips_sentence(val)
    return text


def budget_words(budget: dict[str, float]) -> str:
    """A schedule's budget (derived_from.budget) in words: ``min agreement 0.95``."""
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in budget.items())


def flips_sentence(val: dict[str, Any]) -> str:
    """Under a KL budget whose flips derive also certified (reducers.derive.Budget.with_flips), what that
    added; else ''."""
    implied = val.get("implied_min_agreement")
    if implied is None:
        return ""
    return (f" A flipped answer costs at least {num(val['flip_kl_floor'], 2)} nats of KL here on average, so the "
            f"KL budget also held top-1 agreement to at least {pct(implied, 1)}: a bootstrap of the mean cannot "
            "see flips rarer than about one in its prompts.")


def _fidelity_words(fid: dict[str, Any]) -> str:
    acc = "" if fid.get("accuracy_delta") is None else f", accuracy change {100 * fid['accuracy_delta']:+.1f} points"
    return f"next-token agreement {pct(fid['agreement'], 1)}, KL {num(fid['kl'])} nats{acc}"


CONFIG_NAMES = {"schedule": "derived schedule", "fastv": "FastV (K=2, R=50%)", "pdrop": "PyramidDrop (scaled)",
                "dart": "DART (K=2, keep 22%)", "divprune": "DivPrune (keep 9.8%)",
                "fastv_equal_flops": "FastV K=2 at equal FLOPs", "dart_equal_flops": "DART K=2 at equal FLOPs",
                "divprune_equal_flops": "DivPrune at equal FLOPs", "random_equal_flops": "random at equal FLOPs",
                "pool_equal_flops": "pooling at equal FLOPs", "visionzip": "VisionZip (keep 11%)",
                "visionzip_equal_flops": "VisionZip at equal FLOPs",
                "dynamic_exit_equal_flops": "per-prompt exit at equal FLOPs",
                "sparsevlm": "SparseVLM (192 of 576, scaled)", "sparsevlm_equal_flops": "SparseVLM K=2 at equal FLOPs"}


def config_name(name: str) -> str:
    """A verdict row's name as the report shows it."""
    return CONFIG_NAMES.get(name, name.replace("_", " "))


def steps_short(steps: list[dict[str, Any]]) -> str:
    """Steps in a table cell: 'prune@2 keep 50% · exit@5 · skip 4 (visual)'."""
    parts = []
    for s in steps:
        if s["op"] == "prune_visual":
            parts.append(f"prune@{s['layer']} keep {pct(s['keep'], 1 if 100 * s['keep'] % 1 else 0)}"
                         + ("" if s.get("by", "last_row") == "last_row" else f" {s['by']}")
                         + "".join(f" + {w}" for w in flag_words(s)))
        elif s["op"] == "visual_exit":
            parts.append(f"exit@{s['layer']}")
        elif s["op"] == "visual_exit_dynamic":
            parts.append(f"dynamic exit@{s['from']}{'' if s.get('to') is None else '–' + str(s['to'])} "
                         f"below {pct(s['threshold'], 1)}")
        else:
            parts.append(f"skip {', '.join(map(str, s['layers']))} ({s['tokens']})")
    return " · ".join(parts) or "nothing removed"


def fidelity_name(verdict: dict[str, Any]) -> str:
    """What the verdict's fidelity axis is: task accuracy when the inputs had answers."""
    return "accuracy" if verdict["unreduced"].get("accuracy") is not None else "next-token agreement"


def verdict_sentence(verdict: dict[str, Any] | None) -> str:
    """The derived schedule against the baselines at their FLOPs, and the Pareto front."""
    if verdict is None:
        return "No verification against the baselines (no verdict.json in the run)."
    key = "accuracy" if fidelity_name(verdict) == "accuracy" else "agreement"
    rows = ", ".join(f"{config_name(r['name'])} {pct(r[key], 1)} at {pct(r['flops_ratio'])} FLOPs"
                     for r in verdict["rows"])
    front = ", ".join(config_name(p["name"]) for p in verdict.get("pareto", []))
    return (f"Against the baselines on {verdict['n_examples']} prompts ({fidelity_name(verdict)}): {rows}. "
            f"On the Pareto front of {fidelity_name(verdict)} vs FLOPs: {front or 'none'}.")
