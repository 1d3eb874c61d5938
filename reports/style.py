"""One look for every attnflow figure: seaborn's colour-blind-safe palette, labelled axes,
sizes that read at the report's text width, and the non-interactive Agg backend (reports run
headless, in CI and in worker processes).

Colours carry meaning across figures: each token modality and each curve kind keeps its
colour everywhere, so a reader learns them once.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import seaborn as sns  # noqa: E402  (the backend is chosen before anything draws)
from matplotlib.figure import Figure  # noqa: E402

PALETTE = sns.color_palette("colorblind")
MODALITY_COLORS: dict[str, tuple[float, float, float]] = {
    "bos": PALETTE[7], "system": PALETTE[5], "text": PALETTE[0], "visual": PALETTE[1],
    "answer": PALETTE[2], "pad": (1.0, 1.0, 1.0)}
SERIES_COLORS: dict[str, tuple[float, float, float]] = {
    "all": PALETTE[7], "text": PALETTE[0], "visual": PALETTE[1],
    "observational": PALETTE[0], "knockout": PALETTE[3], "logit_lens": PALETTE[2],
    "derived": PALETTE[3], "full": PALETTE[7]}
PALETTE_BASELINES = [PALETTE[0], PALETTE[4], PALETTE[9], PALETTE[5]]  # never the derived schedule's colour
SEQUENTIAL = "rocket_r"  # perceptually uniform and monotone in lightness: reads in grey too
DIVERGING = "vlag"  # blue-white-red, centred on "as uniform attention would give"
MARK = PALETTE[2]  # sink markers: green stands out on both maps
WIDTH = 6.5  # inches: the report's text width
DPI = 200
RC = {"axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
      "legend.fontsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 10,
      "font.family": "DejaVu Sans", "svg.fonttype": "none"}


def new_figure(height: float, nrows: int = 1, ncols: int = 1, **subplot_kw) -> tuple[Figure, object]:
    """A styled figure of the report's width and ``height`` inches with a grid of axes.

    The Figure is not registered with pyplot, so callers never need to close it and a long
    session building many reports holds no figures it no longer uses.
    """
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, rc=RC)
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
