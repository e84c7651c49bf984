"""UCX data plane: connection set-up, wire protocol, layer-wise push and receive."""
