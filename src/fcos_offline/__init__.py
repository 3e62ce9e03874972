"""fcos-offline: FCOS from a PyTorch checkpoint to verified offline inference."""

__version__ = "0.1.0"
