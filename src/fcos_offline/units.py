"""How accuracy reads, everywhere: JSON holds fractions, people read percent and points.

mAP is stored as a fraction (0.357) under keys such as ``bbox_mAP``; printed, it is a percent
(``35.7%``), and a difference of two mAPs is in *points* (``+0.12 points`` = 0.0012 as a fraction).
Every verb formats through these functions, so a figure reads the same in every table.
"""

from __future__ import annotations

#: what each kind of JSON value is measured in, for a ``units`` field beside the figures
JSON_UNITS = {
    "bbox_mAP": "fraction (0.357 = 35.7%)",
    "map_drop": "mAP points (percent units: 0.30 = 0.0030 as a fraction)",
    "img_per_s": "images per second",
    "ms": "milliseconds",
    "spread_pct": "percent (coefficient of variation of the timed runs)",
}


def percent(fraction: float | None, digits: int = 1) -> str:
    """A fraction as a percent without the sign (``0.3574`` -> ``35.7``); ``—`` for none."""
    return "—" if fraction is None else f"{100 * fraction:.{digits}f}"


def map_text(fraction: float | None, digits: int = 1) -> str:
    """An mAP (a fraction) as people read it: ``35.7%``."""
    return "—" if fraction is None else f"{percent(fraction, digits)}%"


def points(fraction_delta: float | None, digits: int = 2) -> str:
    """A difference of two fractions in signed points (``-0.0016`` -> ``-0.16``); ``—`` for none."""
    return "—" if fraction_delta is None else f"{100 * fraction_delta:+.{digits}f}"
