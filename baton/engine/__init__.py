"""Shared model core: config, weights, decoder, paged KV cache, block manager, scheduler, sampler."""
