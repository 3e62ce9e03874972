"""One formatter for accuracy: percent for people, points for differences, fractions in JSON."""

from __future__ import annotations

from fcos_offline.units import JSON_UNITS, map_text, percent, points


def test_percent_points_and_the_json_units() -> None:
    assert percent(0.3574) == "35.7" and percent(0.3574, 2) == "35.74" and percent(None) == "—"
    assert map_text(0.357) == "35.7%" and map_text(None) == "—"
    assert points(-0.0016) == "-0.16" and points(0.003) == "+0.30" and points(None) == "—"
    assert JSON_UNITS["bbox_mAP"].startswith("fraction") and JSON_UNITS["map_drop"].startswith("mAP points")
