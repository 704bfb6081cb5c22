"""flowagg: a local aggregation daemon that never loses an acknowledged entry."""

__version__ = "0.1.0"
BATCH_FORMAT_VERSION = "2.0.0"
