"""Kiln's version: written into every exported module and tuning-log entry, compared on load."""

__version__ = "0.1.0"


def same_minor(a: str, b: str) -> bool:
    """True when two Kiln versions share major and minor (modules and records stay compatible)."""
    return tuple(a.split(".")[:2]) == tuple(b.split(".")[:2])
