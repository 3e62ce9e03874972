"""CLI verbs of the engine stage."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this stage's verbs (none yet)."""
