"""Compare two models or two dump sets: final outputs, mAP, and intermediate tensors."""
