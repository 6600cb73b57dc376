"""The two labels, their aliases, and label normalisation (pure Python, no dependencies)."""

from __future__ import annotations

import re
import unicodedata

RAIN = "会下雨"
NO_RAIN = "不会下雨"
#: Order is fixed everywhere: column 1 of every probability array is p(RAIN).
LABELS: tuple[str, str] = (NO_RAIN, RAIN)

_ALIASES = {
    RAIN: RAIN, NO_RAIN: NO_RAIN,
    "rain": RAIN, "will_rain": RAIN, "will rain": RAIN, "yes": None,
    "no_rain": NO_RAIN, "norain": NO_RAIN, "no rain": NO_RAIN, "no-rain": NO_RAIN,
    "wont_rain": NO_RAIN, "won't rain": NO_RAIN, "will_not_rain": NO_RAIN,
}
_ALIASES = {k: v for k, v in _ALIASES.items() if v is not None}

# Whitespace (incl. full-width) and trailing punctuation a person or a model adds to an answer.
_TRAILING = "。．.！!？?，,；;：:、…~～ \t\r\n\u3000\"'“”‘’「」『』"


def normalise_label(text: str) -> str | None:
    """Return ``RAIN`` or ``NO_RAIN`` for an exact label (after trimming whitespace and trailing
    punctuation, NFKC, case-folding the ASCII aliases ``rain``/``no_rain``), else ``None``.

    >>> normalise_label(" 会下雨。")
    '会下雨'
    >>> normalise_label("图片中天气晴朗，没有乌云，所以不会下雨") is None
    True
    """
    if not isinstance(text, str):
        return None
    t = unicodedata.normalize("NFKC", text).strip(_TRAILING)
    t = re.sub(r"\s+", " ", t).strip()
    return _ALIASES.get(t) or _ALIASES.get(t.lower())


def label_to_index(label: str) -> int:
    """0 for NO_RAIN, 1 for RAIN (the column of p_rain)."""
    return LABELS.index(label)
