"""mailplat: a multi-service mail server built on Twisted."""

__version__ = "0.1.0"
