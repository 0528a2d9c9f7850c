"""byoai: one LLM in, the best compressed variant per hardware target out."""

__version__ = "0.1.0"
