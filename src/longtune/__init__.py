"""longtune: post-train language models on very long sequences with sequence parallelism."""

__version__ = "0.1.0"
