"""Decode pod: receives KV (or prefills locally), continuous batching, streams token ids."""
