"""UCX data plane: connection set-up, wire protocol, layer-wise push and receive.

The decode pod runs a `KVReceiver` (receiver.py), the prefill pod a `KVSender` (sender.py).
Both live on the event loop that runs ucxx (ucx_runtime.py). protocol.py holds the wire
format and why it looks the way it does; staging.py the pooled buffers both sides use;
event_waiter.py the thread that waits for CUDA events off the loop. Import the submodules: this package stays light
(no torch, no ucxx) until they are used.
"""
