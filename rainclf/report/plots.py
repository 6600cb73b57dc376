"""The evaluation report's plots, drawn from the metrics dict with matplotlib (Agg backend, imported
inside :func:`make_plots` only), returned as PNG bytes keyed by name:

    confusion    one 2×2 matrix per model
    reliability  fraction of 会下雨 against mean p_rain per bin (bins over p_rain), one line per scored model
    roc          ROC curve per model with p_rain (AUC in the legend)
    latency      p50 / p95 latency per image, per model
    quality      exact / extractable / invalid / mixed-language rates of generated answers, per model

Text is ASCII ("rain" = 会下雨, "no rain" = 不会下雨): most servers have no CJK font.
"""

from __future__ import annotations

import io

from rainclf.labels import LABELS, RAIN

TICKS = {RAIN: "rain", LABELS[0]: "no rain"}
DPI = 110
INSTALL_HINT = "pip install matplotlib (or: pip install 'rainclf[report]')"


class PlottingUnavailable(ValueError):
    """matplotlib is missing: the report's plots cannot be drawn."""


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlottingUnavailable(f"the report plots need matplotlib: {INSTALL_HINT} "
                                  "(or pass --no-plots)") from None


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def make_plots(metrics: dict) -> dict[str, bytes]:
    """PNG bytes per plot name (plots without data, e.g. ROC when no model has p_rain, are omitted)."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = metrics["models"]
    names = list(models)
    out: dict[str, bytes] = {}
    colors = plt.get_cmap("tab10")

    # confusion matrices, one small panel per model
    k = len(names)
    cols = min(k, 4)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[k:]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        cm = models[name]["confusion_matrix"]
        mat = cm["matrix"]
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(1, max(max(r) for r in mat)))
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(mat[i][j]), ha="center", va="center", fontsize=12,
                        color="white" if mat[i][j] > 0.6 * max(1, max(max(r) for r in mat)) else "black")
        ticks = [TICKS[lab] for lab in cm["labels"]]
        ax.set_xticks([0, 1], ticks)
        ax.set_yticks([0, 1], ticks)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        inv = models[name].get("n_invalid") or 0
        ax.set_title(name + (f"\n({inv} without a label)" if inv else ""), fontsize=9)
    fig.tight_layout()
    out["confusion"] = _png(fig)

    # reliability diagram
    with_bins = [n for n in names if (models[n].get("curves") or {}).get("reliability")]
    if with_bins:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        for i, n in enumerate(with_bins):
            bins = [b for b in models[n]["curves"]["reliability"] if b["count"]]
            ax.plot([b["mean_p"] for b in bins], [b["frac_pos"] for b in bins], marker="o",
                    color=colors(i % 10), label=f"{n} (ECE {models[n]['ece']:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean p_rain in bin")
        ax.set_ylabel("fraction that is rain")
        ax.legend(fontsize=8, loc="upper left")
        out["reliability"] = _png(fig)

    # ROC curves
    with_roc = [n for n in names if (models[n].get("curves") or {}).get("roc")]
    if with_roc:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        for i, n in enumerate(with_roc):
            roc = models[n]["curves"]["roc"]
            ax.plot(roc["fpr"], roc["tpr"], color=colors(i % 10), label=f"{n} (AUC {models[n]['roc_auc']:.3f})")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate (rain)")
        ax.legend(fontsize=8, loc="lower right")
        out["roc"] = _png(fig)

    # latency bars
    timed = [n for n in names if models[n].get("latency_ms_p50") is not None]
    if timed:
        import numpy as np

        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.6 * len(timed)))
        y = np.arange(len(timed))
        p50 = [models[n]["latency_ms_p50"] for n in timed]
        p95 = [models[n]["latency_ms_p95"] for n in timed]
        ax.barh(y - 0.2, p50, height=0.4, label="p50", color="#4c72b0")
        ax.barh(y + 0.2, p95, height=0.4, label="p95", color="#dd8452")
        ax.set_yticks(y, timed)
        ax.invert_yaxis()
        positive = [v for v in p50 + p95 if v and v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_xscale("log")
        ax.set_xlabel("ms per image")
        ax.legend(fontsize=8)
        out["latency"] = _png(fig)

    # output-quality bars
    # measured answers only: a guaranteed format (heads, constrained decoding) has no rates
    keys = [("format_valid_rate", "exactly a label"), ("extractable_rate", "label inside text"),
            ("invalid_rate", "no label"), ("mixed_language_rate", "mixed language")]
    judged = [n for n in names if models[n].get("format_valid_rate") is not None]
    if judged:
        import numpy as np

        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(judged)), 4))
        x = np.arange(len(judged))
        w = 0.8 / len(keys)
        for j, (key, label) in enumerate(keys):
            ax.bar(x + (j - 1.5) * w, [models[n].get(key) or 0 for n in judged], width=w, label=label)
        ax.set_xticks(x, judged, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.25)  # headroom for the legend above the 100% bars
        ax.set_ylabel("share of answers")
        ax.legend(fontsize=8, ncol=4, loc="upper center")
        out["quality"] = _png(fig)
    return out
