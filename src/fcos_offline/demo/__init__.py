"""Synthetic demo data and the demo model trainer; where the shipped demo model lives."""

from pathlib import Path

#: the demo model shipped with the package (mmdet checkpoint layout, see demo/README.md)
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "fcos_demo.pth"
#: the seed of the demo's train split (calibration images for tune come from it, never from val)
DEMO_TRAIN_SEED = 0
