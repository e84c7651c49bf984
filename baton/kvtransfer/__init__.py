"""UCX data plane: connection set-up, wire protocol, layer-wise push and receive.

The decode pod runs a `KVReceiver` (receiver.py, its header checks in header_checks.py), the
prefill pod a `KVSender` (sender.py: push.py pushes one request, send_window.py bounds what
is in flight, sender_connections.py holds a connection per decode pod). Both live on the
event loop that runs ucxx (ucx_runtime.py). protocol.py holds the wire format and why it
looks the way it does, layout.py a transfer's layer shape and bytes, connection.py one
endpoint; staging.py the pooled buffers both sides use; event_waiter.py the thread that
waits for CUDA events off the loop. Import the submodules: this package stays light (no
torch, no ucxx) until they are used.
"""
