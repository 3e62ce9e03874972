"""Synthetic demo data and the demo model trainer."""
