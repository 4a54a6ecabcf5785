"""Data that ships with Python, for calibration and tests without downloads."""

from bevel.data.text import passages, sentences

__all__ = ["passages", "sentences"]
