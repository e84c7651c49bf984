"""What every pod shares: settings, the engine thread and its loop, the internal HTTP surface,
pod metrics and the registry heartbeat. The pod services (decode_service, prefill_service)
build on it; they never import each other."""
