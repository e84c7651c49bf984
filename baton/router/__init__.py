"""OpenAI-compatible front door: API, tokenization, stop strings, picking pods. Never imports torch."""
