"""Model directories: the pip-shipped SmolLM2 converted to HF format, and tiny random models."""
