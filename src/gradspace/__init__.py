"""gradspace: gradient-based out-of-distribution detection at scale."""

__version__ = "0.1.0"
