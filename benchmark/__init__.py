"""marbench: an open benchmark suite for CT metal artifact reduction."""

__version__ = "0.1.0"
