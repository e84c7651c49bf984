"""Redis schema for the KV-block index and the pod registry; block hashing (torch-free)."""
