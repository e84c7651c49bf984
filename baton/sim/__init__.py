"""A simulated engine for load tests without a GPU: the real scheduler, block manager and
prefix cache, with the model replaced by a timing model and deterministic tokens
(`baton decode --engine sim`, `baton prefill --engine sim`)."""
