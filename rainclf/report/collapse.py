"""The collapse rule: a head that answers one label for everything, or hardly better than that.

A two-label head trained on imbalanced data (about 19% 会下雨 in ../shared/weather) can reach a
good-looking accuracy and a low log-loss by always answering the majority label. Every head's
validation metrics go through ``collapse_flag`` (``model.write_common_files`` calls it, so no head
can skip it): the flag lands in ``metrics.json`` with the validation confusion matrix, a line in
the model card, a warning at the end of ``fit`` and one note from ``predict``.

    collapsed  ⇔  every validation answer is the same label (or none is a label)
                  or validation balanced accuracy ≤ COLLAPSE_BALANCED_ACCURACY
"""

from __future__ import annotations

from rainclf.labels import LABELS

COLLAPSE_BALANCED_ACCURACY = 0.55


def collapse_flag(validation: dict | None) -> dict | None:
    """``{"collapsed": True, "reason", "balanced_accuracy", "confusion_matrix"}`` for validation
    metrics (``report.metrics.classification_metrics``) that show a collapse, else None (also
    when there is no validation split: nothing to judge)."""
    if not validation or not validation.get("n"):
        return None
    cm = validation["confusion_matrix"]["matrix"]            # rows true, columns predicted
    answered = [cm[0][k] + cm[1][k] for k in range(2)]       # per predicted label
    ba = validation.get("balanced_accuracy")
    if sum(answered) == 0:
        reason = "no validation image got a label"
    elif min(answered) == 0:
        label = LABELS[0] if answered[0] else LABELS[1]
        reason = f"it answered {label} for all {sum(answered)} validation images"
    elif ba is not None and ba <= COLLAPSE_BALANCED_ACCURACY:
        reason = f"validation balanced accuracy {ba:.3f} is at most {COLLAPSE_BALANCED_ACCURACY}"
    else:
        return None
    return {"collapsed": True, "reason": reason, "balanced_accuracy": ba,
            "confusion_matrix": validation["confusion_matrix"]}


def collapse_message(metrics: dict | None) -> str | None:
    """One line for a model whose ``metrics.json`` carries the flag, else None."""
    flag = (metrics or {}).get("collapse")
    if not flag:
        return None
    return (f"the head collapsed: {flag['reason']} (confusion matrix rows true "
            f"{'/'.join(LABELS)}: {flag['confusion_matrix']['matrix']}); its labels say little — "
            "try --class-weight balanced, more data of the rare label, or another backbone")
