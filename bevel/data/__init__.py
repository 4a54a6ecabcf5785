"""Data that ships with Python, for calibration and tests without downloads."""

from bevel.data.text import sentences

__all__ = ["sentences"]
