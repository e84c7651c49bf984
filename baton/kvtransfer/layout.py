"""What one request's KV looks like on the wire: how many layers, each one's shape, dtype, bytes.

Both sides describe a transfer with it: the sender checks each pushed layer against it and
announces it in PUSH_BEGIN; the receiver checks PUSH_BEGIN and every LAYER header against it
(header_checks.py) and views received bytes through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from baton.kvtransfer import protocol


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    layer_shape: tuple[int, ...]
    dtype: torch.dtype
    dtype_name: str = field(init=False)  # torch's name without "torch.", as PUSH_BEGIN says it
    layer_nbytes: int = field(init=False)

    def __post_init__(self):
        # Set here, not lazily: an unsupported dtype raises ProtocolError where the transfer
        # is made (begin() or expect()), not later on the loop.
        object.__setattr__(self, "layer_shape", tuple(self.layer_shape))
        object.__setattr__(self, "dtype_name", str(self.dtype).removeprefix("torch."))
        object.__setattr__(
            self, "layer_nbytes", protocol.layer_nbytes(self.layer_shape, self.dtype_name)
        )
