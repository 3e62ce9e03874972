"""fcos-offline: dense detectors (FCOS, RetinaNet, ATSS) from a PyTorch checkpoint to verified offline inference."""

import os

# OpenMP threads that spin while waiting (the GNU default) slow PyTorch down up to 40x on a
# small machine shared with other work (measured here: 2.1 s vs 0.05 s per demo image).
# Set before torch is imported; an explicit OMP_WAIT_POLICY from the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
