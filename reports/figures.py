"""The report's figures: one function per figure, each returning a matplotlib Figure, and
``save_figures`` writing them all as PNG (and SVG on request, for papers) into
``run_dir/figures`` in one atomic swap.

A figure whose data the run does not have (no visual tokens, no exit analysis, no schedule
or verdict) raises ``NotApplicable`` with the reason; ``save_figures`` records that reason in
``figures/index.json`` so that the report says why instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from attnflow.analyses.arrays import nanmean
from attnflow.analyses.groups import has_visual, position_label
from attnflow.analyses.sinks import sink_scores
from attnflow.fileio import atomic_dir, write_json
from attnflow.probes.inputs import InputError, load_examples
from attnflow.probes.schema import GROUPS
from attnflow.reports.rundir import ReportError, Run, load_run
from attnflow.reports.style import (
    DIVERGING,
    MARK,
    MODALITY_COLORS,
    PALETTE_BASELINES,
    SEQUENTIAL,
    SERIES_COLORS,
    new_figure,
)
from attnflow.reports.tokens import tokens_per_layer
from attnflow.reports.words import config_name, fidelity_name

FORMATS = ("png", "svg")  # PNG is what the PDF embeds; SVG doubles the drawing time
MAX_LOG2 = 6.0  # colour scale of received/uniform saturates at 64x (planted sinks reach 2^60)
INDEX = "index.json"


class NotApplicable(Exception):
    """The run has no data this figure could show; the message says why."""


def _token_labels(trace: xr.Dataset) -> tuple[list[str], list[str]]:
    """Per position, the most common (token, modality) over the samples that have it."""
    real = (trace["modality"] != "pad").transpose("sample", "pos").values
    pairs = [position_label(trace, pos, real[:, pos]) for pos in range(real.shape[1])]
    return [token for token, _ in pairs], [mod for _, mod in pairs]


def _modality_strip(ax, modalities: list[str]) -> list[Patch]:
    """Colour a strip above ``ax``'s first row by each position's modality; returns the
    legend handles that name the colours."""
    for pos, mod in enumerate(modalities):
        ax.add_patch(Rectangle((pos - 0.5, -1.0), 1.0, 0.45, color=MODALITY_COLORS[mod], clip_on=False))
    return [Patch(color=MODALITY_COLORS[m], label=f"{m} (top strip)") for m in GROUPS if m in modalities]


def _position_ticks(ax, labels: list[str], keep: set[int]) -> None:
    """Token labels on the x axis: all of them when few, else every k-th plus ``keep``."""
    n = len(labels)
    step = 1 if n <= 40 else int(np.ceil(n / 30))
    ticks = sorted(set(range(0, n, step)) | keep)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{labels[t]} ({t})" if n > 40 else labels[t] for t in ticks], rotation=90)


def flow_heatmap(findings: dict[str, Any]) -> Figure:
    """Layer x (query group -> key group): the share of its attention each query group pays
    each key group, averaged over samples and heads (``findings.flow.matrix``)."""
    flow = findings["flow"]
    matrix = np.asarray(flow["matrix"], dtype=float)  # [layer, src, dst]
    src, dst = flow["labels"]["src"], flow["labels"]["dst"]
    layers = flow["labels"]["layer"]
    src_on = [i for i in range(len(src)) if matrix[:, i, :].sum() > 0]
    dst_on = [j for j in range(len(dst)) if matrix[:, :, j].sum() > 0]
    pairs = [(i, j) for i in src_on for j in dst_on]
    values = np.stack([matrix[:, i, j] for i, j in pairs], 1)
    fig, axes = new_figure(1.2 + 0.28 * len(layers))
    ax = axes[0, 0]
    image = ax.imshow(values, aspect="auto", cmap=SEQUENTIAL, vmin=0.0, vmax=1.0, interpolation="nearest")
    if values.size <= 300:
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v > 0.55 else "black")
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels([f"{src[i]}→{dst[j]}" for i, j in pairs], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(layer) for layer in layers])
    for k in range(1, len(src_on)):
        ax.axvline(k * len(dst_on) - 0.5, color="white", lw=2)
    ax.grid(False)
    ax.set_xlabel("query group → key group")
    ax.set_ylabel("layer")
    ax.set_title("Attention flow between token groups (mean over samples and heads)")
    fig.colorbar(image, ax=ax, label="share of the query group's attention")
    return fig


def received_attention(trace: xr.Dataset, findings: dict[str, Any]) -> Figure:
    """Per layer and position, the attention a key receives over what uniform attention would
    give it (head with the largest ratio, mean over samples), sinks marked."""
    score = sink_scores(trace).transpose("sample", "layer", "head", "pos").values
    score = np.where(np.isfinite(score), score, np.nan)  # pads are NaN; x/0 keys seen by nobody
    strongest = np.full(score.shape[:2] + score.shape[3:], np.nan)  # [sample, layer, pos]
    seen = ~np.isnan(score).all(2)
    strongest[seen] = np.nanmax(np.moveaxis(score, 2, -1)[seen], -1)
    with np.errstate(divide="ignore"):
        ratio = np.log2(nanmean(strongest, 0))
    labels, mods = _token_labels(trace)
    layers = trace["layer"].values
    sinks = findings["sinks"]["tokens"]
    fig, axes = new_figure(2.4 + 0.2 * len(layers))
    ax = axes[0, 0]
    finite = ratio[np.isfinite(ratio)]
    span = float(np.clip(np.abs(finite).max(), 1.0, MAX_LOG2)) if finite.size else 1.0
    image = ax.imshow(ratio, aspect="auto", cmap=DIVERGING, norm=TwoSlopeNorm(0.0, -span, span),
                      interpolation="nearest")
    row = {int(layer): i for i, layer in enumerate(layers)}
    ax.scatter([s["pos"] for s in sinks], [row[s["layer"]] for s in sinks], marker="o", s=40,
               facecolors="none", edgecolors=MARK, lw=1.5, label="sink")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(layer) for layer in layers])
    _position_ticks(ax, labels, {s["pos"] for s in sinks})
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylim(len(layers) - 0.5, -1.0)
    handles = _modality_strip(ax, mods) + ([ax.collections[0]] if sinks else [])
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    ax.grid(False)
    ax.set_xlabel("key position (most common token)")
    ax.set_ylabel("layer")
    ax.set_title("Attention received relative to uniform attention (strongest head, mean over samples)")
    fig.colorbar(image, ax=ax, label="log₂(received / uniform)", extend="both")
    return fig


def sink_heads(findings: dict[str, Any]) -> Figure:
    """Per layer and head, the largest received/uniform ratio any key reaches: where sink
    heads are (``findings.sinks.head_scores``)."""
    scores = np.asarray(findings["sinks"]["head_scores"], dtype=float)
    ratio = findings["thresholds"]["sink_ratio"]
    fig, axes = new_figure(1.0 + 0.3 * scores.shape[0])
    ax = axes[0, 0]
    image = ax.imshow(scores, aspect="auto", cmap=SEQUENTIAL, vmin=1.0,
                      vmax=max(float(scores.max()), ratio), interpolation="nearest")
    if scores.size <= 200:
        for (r, c), v in np.ndenumerate(scores):
            ax.text(c, r, f"{v:.2f}" if v < 10 else f"{v:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if v >= ratio else "black")
    ax.set_xticks(range(scores.shape[1]))
    ax.set_yticks(range(scores.shape[0]))
    ax.grid(False)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"Strongest sink score per head (sink threshold: {ratio:g}× uniform)")
    fig.colorbar(image, ax=ax, label="max received / uniform")
    return fig


def sample_image(trace: xr.Dataset, sample: int, image: int) -> Image.Image | None:
    """The ``image``-th image of ``sample`` from the trace's inputs JSONL, None when the file
    is gone or unreadable (the patch grid is then drawn without it)."""
    path = Path(str(trace.attrs.get("inputs_path", "")))
    if not path.is_file():
        return None
    try:
        examples = load_examples(path)
    except InputError:
        return None
    if sample >= len(examples) or image >= len(examples[sample].images):
        return None
    return examples[sample].images[image]


def _first_visual_sample(trace: xr.Dataset) -> int:
    visual = (trace["modality"] == "visual").transpose("sample", "pos").values
    return int(np.flatnonzero(visual.any(1))[0])


def _patch_grid(sample: xr.Dataset, values: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """``values`` [pos] of the sample's first image's visual tokens on its patch grid (the
    mean where several tokens share a cell, as image tiles do), and each position's cell."""
    on = (sample["modality"].values == "visual") & (sample["image"].values == 0) & (sample["patch_row"].values >= 0)
    pos = np.flatnonzero(on)
    rows, cols = sample["patch_row"].values[pos].astype(int), sample["patch_col"].values[pos].astype(int)
    grid, count = np.zeros((rows.max() + 1, cols.max() + 1)), np.zeros((rows.max() + 1, cols.max() + 1))
    np.add.at(grid, (rows, cols), values[pos])
    np.add.at(count, (rows, cols), 1)
    return grid / np.maximum(count, 1), {int(p): (int(r), int(c)) for p, r, c in zip(pos, rows, cols)}


def patch_attention(trace: xr.Dataset, findings: dict[str, Any], image: Image.Image | None = None) -> Figure:
    """The last prompt position's attention (head mean) over the patch grid of the first
    sample's first image at a few layers, beside the image itself (on the same grid) when it
    is given; visual sinks outlined."""
    if not has_visual(trace):
        raise NotApplicable("the model saw no visual tokens (text-only or encoder model)")
    s = _first_visual_sample(trace)
    sample = trace.isel(sample=s)
    layers = trace["layer"].values
    n_layers = min(3 if image is not None else 4, len(layers))
    shown = sorted({int(i) for i in np.linspace(0, len(layers) - 1, n_layers).round()})
    last = sample["last_row"].transpose("layer", "head", "pos").values.mean(1)  # [layer, pos]
    grids = [_patch_grid(sample, last[li]) for li in shown]
    cells = grids[0][1]
    sinks = {v["pos"] for v in findings["sinks"].get("visual", [])}
    sinks |= {t["pos"] for t in findings["sinks"]["tokens"] if t["modality"] == "visual"}
    shape = grids[0][0].shape
    extent = (-0.5, shape[1] - 0.5, shape[0] - 0.5, -0.5)
    fig, axes = new_figure(2.2, 1, len(shown) + (image is not None))
    panels = list(axes[0])
    if image is not None:
        ax = panels.pop(0)
        ax.imshow(image, extent=extent)
        ax.set_title(f"sample {s}: the image")
    vmax = max(max(float(g.max()) for g, _ in grids), 1e-12)
    for ax, li, (grid, _) in zip(panels, shown, grids):
        heat = ax.imshow(grid, cmap=SEQUENTIAL, vmin=0.0, vmax=vmax, extent=extent, interpolation="nearest")
        ax.set_title(f"layer {int(layers[li])}")
    for ax in axes[0]:
        for p in sinks & set(cells):
            r, c = cells[p]
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=MARK, lw=2))
        ax.set_xticks(range(0, shape[1], max(1, shape[1] // 6)))
        ax.set_yticks(range(0, shape[0], max(1, shape[0] // 6)))
        ax.set_xlabel("patch column")
        ax.grid(False)
    axes[0, 0].set_ylabel("patch row")
    what = "" if image is not None else " (no image file recorded with the trace: patch grid only)"
    fig.suptitle(f"Last-position attention on the patch grid{what}"
                 + ("; visual sinks outlined" if sinks & set(cells) else ""))
    fig.colorbar(heat, ax=panels, label="attention share per patch", shrink=0.8)
    return fig


def massive_activations(trace: xr.Dataset, findings: dict[str, Any]) -> Figure:
    """Per layer, the largest |x| of each token group's hidden states against the typical
    median |x|: massive activations stand orders of magnitude above the median."""
    max_abs = trace["max_abs"].transpose("sample", "layer", "pos").values
    median_abs = trace["median_abs"].transpose("sample", "layer", "pos").values
    modality = trace["modality"].transpose("sample", "pos").values
    layers = trace["layer"].values
    th = findings["thresholds"]
    fig, axes = new_figure(2.6)
    ax = axes[0, 0]
    for mod in GROUPS:
        on = modality == mod
        if on.any():
            ax.plot(layers, np.nanmax(np.where(on[:, None, :], max_abs, np.nan), (0, 2)), marker="o",
                    color=MODALITY_COLORS[mod], label=f"max |x|, {mod} tokens")
    typical = np.nanmedian(median_abs.transpose(1, 0, 2).reshape(len(layers), -1), 1)
    ax.plot(layers, typical, color="black", ls="--", label="median |x| (typical token)")
    ax.plot(layers, typical * th["massive_layer_ratio"], color="black", ls=":",
            label=f"massive threshold ({th['massive_layer_ratio']:g}× median)")
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel("layer (output hidden state)")
    ax.set_ylabel("|activation| (residual-stream units)")
    dims = findings["sinks"]["dims"]
    ax.set_title("Massive activations: " + (f"dimensions {', '.join(map(str, dims[:6]))}" if dims
                                            else "none found"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def redundancy(findings: dict[str, Any]) -> Figure:
    """Block Influence (1 - mean cos(layer input, output)) per layer and token group, with
    the redundancy threshold and the candidate layers."""
    red = findings["redundancy"]
    bi = red["block_influence"]
    th = findings["thresholds"]["redundant_bi"]
    fig, axes = new_figure(2.4)
    ax = axes[0, 0]
    n = len(bi["all"])
    groups = [g for g in ("all", "text", "visual") if any(v is not None for v in bi[g])]
    width = 0.8 / len(groups)
    for k, g in enumerate(groups):
        values = np.array([np.nan if v is None else v for v in bi[g]])
        ax.bar(np.arange(n) + (k - (len(groups) - 1) / 2) * width, values, width, color=SERIES_COLORS[g],
               label=f"{g} tokens")
    ax.axhline(th, color="black", ls=":", label=f"candidate threshold ({th:g})")
    for k, layer in enumerate(red["candidates"]):
        ax.axvspan(layer - 0.45, layer + 0.45, color=MARK, alpha=0.15, lw=0,
                   label="candidate layer" if k == 0 else None)
    ax.set_xticks(range(n))
    ax.set_xlabel("layer")
    ax.set_ylabel("Block Influence (1 − cos)")
    missing = [g for g in ("all", "text", "visual") if g not in groups]
    ax.set_title("Redundancy per layer and token group"
                 + (f" ({', '.join(missing)}: no such tokens)" if missing else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


_EXIT_PANELS = (
    ("observational", "share of attention on visual tokens", "observational"),
    ("knockout", "output change (KL, nats)", "knockout from layer ℓ on"),
    ("logit_lens", "lens probability of the final token", "logit lens"),
)


def exit_curves(findings: dict[str, Any]) -> Figure:
    """The three exit criteria per layer (observational share, knockout output change, logit
    lens), each with the exit layer it gives; the chosen criterion's layer is drawn bold."""
    ex = findings["exit"]
    if not ex["applies"]:
        raise NotApplicable(ex.get("reason", "the exit analysis does not apply to this model"))
    fig, axes = new_figure(2.4, 1, 3, sharex=True)
    num_layers = findings["model"]["num_layers"]
    for ax, (key, ylabel, title) in zip(axes[0], _EXIT_PANELS):
        curve = ex["curves"].get(key)
        info = ex["layers"].get(key)
        ax.set_title(title)
        ax.set_xlabel("layer ℓ")
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.5, num_layers + 0.5)
        if curve is None:
            ax.text(0.5, 0.5, "not measured:\nneeds the model\n(attnflow analyze --model)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=7)
            continue
        values = np.array([np.nan if v is None else v for v in curve])
        ax.plot(range(len(values)), values, marker="o", color=SERIES_COLORS[key],
                label="text queries" if key == "observational" else None)
        if key == "knockout":
            metric = ex["layers"]["knockout"].get("metric", "kl")
            ax.set_ylabel("output change (KL, nats)" if metric == "kl" else "|Δ answer probability| (relative)")
            ax.axhline(info["tolerance"], color="black", ls=":", label=f"tolerance {info['tolerance']:g}")
        if key == "observational":
            ax.plot(range(len(ex["curves"]["observational_last"])), ex["curves"]["observational_last"],
                    marker=".", ls="--", color=SERIES_COLORS[key], alpha=0.6, label="last position only")
        if info is not None:
            chosen = key == ex["criterion"]
            ax.axvline(info["layer"], color=SERIES_COLORS["derived"] if chosen else "grey",
                       lw=2.5 if chosen else 1.2, ls="-" if chosen else "--",
                       label=f"exit ℓ = {info['layer']}" + (" (chosen)" if chosen else ""))
        ax.legend(loc="best", frameon=False)
    fig.suptitle("Where visual tokens stop mattering (exit layer ℓ: visual tokens can go from ℓ on)")
    return fig


def schedule_tokens(trace: xr.Dataset, schedule: dict[str, Any] | None) -> Figure:
    """Tokens each decoder layer processes under the schedule, per modality (mean over the
    trace's samples), beside the unreduced model; skipped layers are hatched."""
    if schedule is None:
        raise NotApplicable("no schedule.json in the run (attnflow schedule)")
    processed = tokens_per_layer(trace, schedule)
    unskipped = [s for s in schedule["steps"] if s["op"] != "skip_layers"]
    carried = sum(tokens_per_layer(trace, {**schedule, "steps": unskipped}).values())
    full = sum(tokens_per_layer(trace, {**schedule, "steps": []}).values())
    layers = np.arange(len(full))
    skipped = sorted(layer for s in schedule["steps"] if s["op"] == "skip_layers" for layer in s["layers"])
    fig, axes = new_figure(2.6)
    ax = axes[0, 0]
    bottom = np.zeros(len(layers))
    for mod, counts in processed.items():
        ax.bar(layers, counts, bottom=bottom, color=MODALITY_COLORS[mod], label=mod, width=0.7)
        bottom += counts
    for layer in skipped:
        ax.bar(layer, carried[layer] - bottom[layer], bottom=bottom[layer], width=0.7, fill=False, hatch="///",
               edgecolor="grey", lw=0, label="bypassing a skipped layer" if layer == min(skipped) else None)
    ax.step(np.r_[layers - 0.5, layers[-1] + 0.5], np.r_[full, full[-1]], where="post", color="black",
            ls="--", label="unreduced model")
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("tokens processed (mean per sample)")
    ax.set_title("The schedule: tokens alive per layer")
    ax.legend(title="token", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def pareto(verdict: dict[str, Any] | None) -> Figure:
    """Fidelity (accuracy, else next-token agreement) and KL against predicted prefill FLOPs
    for the derived schedule, the baselines and the unreduced model; the Pareto front joined."""
    if verdict is None:
        raise NotApplicable("no verdict.json in the run (attnflow verify)")
    key = "accuracy" if fidelity_name(verdict) == "accuracy" else "agreement"
    full = verdict["unreduced"].get("accuracy") if key == "accuracy" else 1.0
    rows = verdict["rows"]
    fig, axes = new_figure(2.8, 1, 2)
    panels = ((axes[0, 0], key, fidelity_name(verdict)), (axes[0, 1], "kl", "KL(full ‖ reduced), nats"))
    for ax, field, label in panels:
        ax.scatter([1.0], [full if field == key else 0.0], marker="s", s=40, color=SERIES_COLORS["full"],
                   label="unreduced model", zorder=3)
        for k, r in enumerate(rows):
            derived = r["name"] == "schedule"
            ax.scatter(r["flops_ratio"], r[field], s=90 if derived else 40, zorder=4,
                       marker="*" if derived else "o",
                       color=SERIES_COLORS["derived"] if derived else PALETTE_BASELINES[k % len(PALETTE_BASELINES)],
                       label=config_name(r["name"]))
        if field == key:
            front = sorted([(r["flops_ratio"], r[key]) for r in rows if r.get("pareto")] + [(1.0, full)])
            ax.plot(*zip(*front), color="black", lw=0.8, ls="--", label="Pareto front", zorder=2)
        ax.set_xlabel("predicted prefill FLOPs (share of unreduced)")
        ax.set_ylabel(label)
    values = [full] + [r[key] for r in rows]
    axes[0, 0].set_ylim(max(0.0, min(values) - 0.05), 1.02)
    axes[0, 1].set_ylim(bottom=0.0)
    axes[0, 1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle(f"Fidelity vs cost on {verdict['n_examples']} prompts ({verdict['device']}, {verdict['backend']})")
    return fig


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the report: its file name, caption and how to draw it from a Run."""

    name: str
    caption: str
    draw: Callable[[Run], Figure]


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("flow", "Attention flow: the share of each query group's attention paid to each key group, "
               "per layer (mean over samples and heads).", lambda r: flow_heatmap(r.findings)),
    FigureSpec("received", "Attention received per key position and layer relative to uniform attention "
               "(log₂; 0 = what uniform attention would give); sinks circled.",
               lambda r: received_attention(r.trace, r.findings)),
    FigureSpec("sink_heads", "Strongest sink score per layer and head.", lambda r: sink_heads(r.findings)),
    FigureSpec("patches", "Last-position attention over the patch grid of a sample image at several layers; "
               "visual sinks outlined.",
               lambda r: patch_attention(r.trace, r.findings, _image_of(r.trace))),
    FigureSpec("massive", "Largest activation magnitude per layer and token group against the typical "
               "median magnitude (log scale).", lambda r: massive_activations(r.trace, r.findings)),
    FigureSpec("redundancy", "Block Influence per layer and token group; candidates for removal shaded.",
               lambda r: redundancy(r.findings)),
    FigureSpec("exit", "Exit curves: observational attention share, knockout output change and logit "
               "lens, with the exit layer each criterion gives.", lambda r: exit_curves(r.findings)),
    FigureSpec("schedule", "The derived schedule as tokens processed per layer and modality.",
               lambda r: schedule_tokens(r.trace, r.schedule)),
    FigureSpec("pareto", "Fidelity and KL against predicted prefill FLOPs: the derived schedule (star) "
               "and the fixed baselines, with the Pareto front.", lambda r: pareto(r.verdict)),
)


def _image_of(trace: xr.Dataset) -> Image.Image | None:
    return sample_image(trace, _first_visual_sample(trace), 0) if has_visual(trace) else None


def write_figures(run: Run, formats: tuple[str, ...] = ("png",)) -> dict[str, dict[str, Any]]:
    """Draw every figure of ``run`` and replace ``run.dir/figures`` with them in one atomic swap:
    each figure in ``formats`` (PNG always: the PDF embeds it) and ``index.json``. Returns the
    index: per figure its caption, its PNG file name (None when left out) and why it was left
    out (None when drawn)."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ReportError(f"figure formats {unknown} are not supported; supported: {', '.join(FORMATS)}")
    formats = ("png", *[f for f in formats if f != "png"])
    index: dict[str, dict[str, Any]] = {}
    with atomic_dir(run.dir / "figures") as tmp:
        for spec in FIGURES:
            try:
                fig = spec.draw(run)
            except NotApplicable as why:
                index[spec.name] = {"caption": spec.caption, "file": None, "skipped": str(why)}
                continue
            for fmt in formats:
                fig.savefig(tmp / f"{spec.name}.{fmt}", format=fmt)
            index[spec.name] = {"caption": spec.caption, "file": f"{spec.name}.png", "skipped": None}
        write_json(tmp / INDEX, index)
    return index


def save_figures(run_dir: str | Path, formats: tuple[str, ...] = ("png",)) -> dict[str, Path]:
    """Draw the figures of the run in ``run_dir`` into ``run_dir/figures`` (see write_figures);
    returns the PNG path of each figure drawn."""
    run = load_run(run_dir)
    index = write_figures(run, formats)
    return {name: run.dir / "figures" / entry["file"] for name, entry in index.items() if entry["file"]}
