"""Prefill pod: batched/chunked prefill with prefix reuse, pushing KV to decode pods."""
