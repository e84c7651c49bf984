"""Staging pools: reusable flat uint8 buffers, on the receiver (what UCX receives into) and on
the sender (where small layers are coalesced into one message).

Requests differ in length, so layer sizes differ from one request to the next. An exact-size
pool would rarely hit. Buffers come in size classes instead: four per doubling, so at most a
quarter of a buffer is unused. A recv gets a view of exactly the announced size: a sender
that sends more than it announced raises UCXMessageTruncatedError rather than going
unnoticed. At most `max_idle_bytes` of free buffers are kept; beyond that a released buffer
is dropped (torch frees it, or its caching allocator keeps it on CUDA).

Buffers that live on are what UCX has registered already (its registration cache, and on
the peer the CUDA IPC mapping), so a reused buffer costs UCX nothing new. The sender takes
buffers on the model thread and gives them back on the event loop, so the pool has a lock;
it is never held across anything slow.
"""

from __future__ import annotations

import threading

import torch

_MIN_CLASS = 4096


def size_class(nbytes: int) -> int:
    """Smallest class >= nbytes: a multiple of a quarter of nbytes' power of two."""
    if nbytes <= _MIN_CLASS:
        return _MIN_CLASS
    step = 1 << max(nbytes.bit_length() - 3, 0)
    return -(-nbytes // step) * step


class StagingBuffer:
    """One pooled buffer. `view(n)` is what ucxx receives into. `typed()` is what on_layer gets."""

    __slots__ = ("nbytes", "tensor")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.nbytes = 0  # bytes of the current message

    def view(self, nbytes: int):
        """The first `nbytes` as something ucxx accepts.

        ucxx takes CUDA tensors as they are (__cuda_array_interface__). CPU tensors have to
        be numpy arrays: `ep.recv(cpu_tensor)` raises TypeError.
        """
        self.nbytes = nbytes
        flat = self.tensor[:nbytes]
        return flat if flat.is_cuda else flat.numpy()

    def typed(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        return self.tensor[offset : offset + n].view(dtype).view(shape)


class StagingPool:
    def __init__(self, device: torch.device | str = "cpu", max_idle_bytes: int = 1 << 30):
        self.device = torch.device(device)
        self.max_idle_bytes = max_idle_bytes
        self._free: dict[int, list[StagingBuffer]] = {}
        self.bytes_in_use = 0
        self.bytes_idle = 0
        self.buffers_in_use = 0
        self.allocations = 0  # fresh buffers made: tests check that reuse happens
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> StagingBuffer:
        cls = size_class(nbytes)
        with self._lock:
            free = self._free.get(cls)
            buf = free.pop() if free else None
            if buf is not None:
                self.bytes_idle -= cls
            else:
                self.allocations += 1
            self.bytes_in_use += cls
            self.buffers_in_use += 1
        if buf is None:  # outside the lock: a CUDA allocation may take a while
            buf = StagingBuffer(torch.empty(cls, dtype=torch.uint8, device=self.device))
        return buf

    def release(self, buf: StagingBuffer) -> None:
        cls = buf.tensor.numel()
        buf.nbytes = 0
        with self._lock:
            self.bytes_in_use -= cls
            self.buffers_in_use -= 1
            if self.bytes_idle + cls <= self.max_idle_bytes:
                self._free.setdefault(cls, []).append(buf)
                self.bytes_idle += cls

    def clear(self) -> None:
        """Drop every idle buffer."""
        with self._lock:
            self._free.clear()
            self.bytes_idle = 0


class SenderStaging:
    """The sender's pools of coalescing buffers, one per device, each with the side stream
    (CUDA) that copies layers into its buffers. Thread-safe."""

    def __init__(self, max_idle_bytes: int):
        self.max_idle_bytes = max_idle_bytes
        self._lock = threading.Lock()
        self._pools: dict[torch.device, tuple[StagingPool, object]] = {}  # device -> (pool, stream)

    def for_device(self, device: torch.device) -> tuple[StagingPool, object]:
        """The pool on `device`, and its side stream (None off CUDA)."""
        with self._lock:
            entry = self._pools.get(device)
            if entry is None:
                stream = torch.cuda.Stream(device) if device.type == "cuda" else None
                entry = self._pools[device] = (StagingPool(device, self.max_idle_bytes), stream)
            return entry

    def pools(self) -> list[StagingPool]:
        with self._lock:
            return [pool for pool, _ in self._pools.values()]

    def clear(self) -> None:
        """Drop every idle buffer."""
        for pool in self.pools():
            pool.clear()
