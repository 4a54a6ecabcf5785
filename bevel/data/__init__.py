"""Data that ships with Python, for calibration and tests without downloads."""

from bevel.data.text import passages, prefixes, sentences

__all__ = ["passages", "prefixes", "sentences"]
