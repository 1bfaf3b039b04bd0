"""Data: building shard datasets, streaming and masking them, and labeled task files."""
