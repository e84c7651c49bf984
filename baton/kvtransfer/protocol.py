"""The KV data plane's wire protocol: versioned msgpack control messages and their framing.

One connection is one UCX endpoint, opened by the sender (prefill pod) to the receiver's
listener (decode pod). Two kinds of tagged message travel on it:

- Control messages, on the endpoint's own tag, in submission order: a 4-byte little-endian
  length, then a msgpack map ``{"v": VERSION, "k": kind, ...fields}``. Each side keeps one
  recv posted into a ``CONTROL_MAX_BYTES`` buffer. ucxx does not report how many bytes a
  recv got (a larger buffer succeeds silently, a smaller one raises), so the length prefix
  says where the message ends.
- Payloads. A LAYER header carries ``seq``, ``layers`` and ``nbytes``; its payload is one
  message on the tag derived from ``seq``, which is unique on the connection: the listed
  layers of one request back to back, in the order listed, each ``layer_nbytes`` long (so
  ``nbytes == len(layers) * layer_nbytes``). The sender lists one layer, or coalesces a few
  small ones into one message; the receiver accepts any set of layers not yet received. The
  receiver posts a recv of exactly ``nbytes`` on that tag as soon as it has read the header.
  Several payloads of a connection may be in flight at once; the header always goes out
  with its payload send, never ahead of it.

Why a tag per payload, and not one ordered stream of header, payload, header, payload:
- The receiver can post payload k's recv and go on reading header k+1. Payloads may complete
  in any order, and several can be in flight without a lock on either side.
- Order matters only on the control tag, and submission order (FIFO) gives it there.
- A lost or extra message shows up as a recv that never completes. In one shared stream it
  would shift every later payload into the wrong buffer, and nothing would notice.

Payloads for a reservation the receiver no longer wants (unknown, cancelled, expired) are
still received, into a staging buffer that goes straight back to the pool. They have to be
read off the wire: a rendezvous send completes only when the receiver matches it, so an
unread payload would pin the sender's staging until the connection closes. An eager payload
would sit in UCX's unexpected-message queue for good.

Each request's messages from the sender are: PUSH_BEGIN, then LAYER*, then exactly one of
DONE or CANCEL. That closing message lets the receiver forget the request. The receiver only
ever sends HELLO, CANCEL and ERROR. A CANCEL from the receiver makes the sender stop and
close the request with its own CANCEL.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, fields

import msgpack

VERSION = 1
CONTROL_MAX_BYTES = 64 * 1024
_LEN = struct.Struct("<I")

# dtype name -> bytes per element. Names are torch's (`str(torch.bfloat16)` minus "torch.").
DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


class ProtocolError(Exception):
    """A message that this version cannot decode or that breaks the protocol."""


def layer_nbytes(shape: tuple[int, ...] | list[int], dtype: str) -> int:
    if dtype not in DTYPE_SIZES:
        raise ProtocolError(f"unsupported dtype {dtype!r}")
    return math.prod(shape) * DTYPE_SIZES[dtype]


@dataclass(frozen=True)
class Hello:
    """First message each way on a new connection: who is there, and which protocol.

    With a shared secret, each side proves it (internal_auth.ucx_proof): the sender over the
    address it dialled, its clock and a fresh nonce; the receiver over the same nonce. A
    receiver closes a connection whose HELLO does not prove it."""

    pod_id: str
    role: str  # "sender" or "receiver"
    address: str = ""  # sender: the receiver's host:port as dialled
    ts: float = 0.0  # sender: its clock (time.time()) when it sent the HELLO
    nonce: bytes = b""  # sender: 16 fresh random bytes
    proof: bytes = b""  # HMAC-SHA256 proof of the secret; b"": none


@dataclass(frozen=True)
class PushBegin:
    """The sender starts a request's transfer into one reservation on the receiver."""

    request_id: str
    reservation_id: str
    num_layers: int
    layer_shape: list[int]
    dtype: str
    layer_nbytes: int


@dataclass(frozen=True)
class Layer:
    """Header of one payload message: `layers` back to back, `nbytes` in all, on tag `seq`."""

    request_id: str
    seq: int
    layers: list[int]
    nbytes: int


@dataclass(frozen=True)
class Done:
    """The sender pushed every layer. Carries the first sampled token."""

    request_id: str
    first_token: int
    first_logprob: float | None = None
    # [[token_id, logprob], ...]: the top alternatives, when the request asked for logprobs.
    top_logprobs: list[list] | None = None


@dataclass(frozen=True)
class Cancel:
    request_id: str
    reason: str


@dataclass(frozen=True)
class Error:
    """A protocol-level complaint, about one request or (request_id None) the connection."""

    reason: str
    request_id: str | None = None


Message = Hello | PushBegin | Layer | Done | Cancel | Error

_KINDS: dict[str, type] = {
    "HELLO": Hello,
    "PUSH_BEGIN": PushBegin,
    "LAYER": Layer,
    "DONE": Done,
    "CANCEL": Cancel,
    "ERROR": Error,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}
_FIELDS = {cls: frozenset(f.name for f in fields(cls)) for cls in _KINDS.values()}


def encode(msg: Message) -> bytes:
    """Length-prefixed msgpack frame of one control message."""
    body = msgpack.packb({"v": VERSION, "k": _KIND_OF[type(msg)], **asdict(msg)})
    if _LEN.size + len(body) > CONTROL_MAX_BYTES:
        raise ProtocolError(f"{_KIND_OF[type(msg)]} is {len(body)} bytes, over {CONTROL_MAX_BYTES}")
    return _LEN.pack(len(body)) + body


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """The control message at the start of `frame`. Bytes after it are ignored."""
    frame = memoryview(frame)
    if len(frame) < _LEN.size:
        raise ProtocolError("frame shorter than its length prefix")
    (n,) = _LEN.unpack_from(frame)
    if _LEN.size + n > len(frame):
        raise ProtocolError(f"frame says {n} bytes, buffer holds {len(frame) - _LEN.size}")
    try:
        raw = msgpack.unpackb(frame[_LEN.size : _LEN.size + n])
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable control message: {e}") from e
    if not isinstance(raw, dict):
        raise ProtocolError("control message is not a map")
    version = raw.pop("v", None)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {VERSION}")
    cls = _KINDS.get(raw.pop("k", None))
    if cls is None:
        raise ProtocolError("unknown message kind")
    # Fields this version does not know are dropped, so a newer peer may add optional ones.
    try:
        return cls(**{k: v for k, v in raw.items() if k in _FIELDS[cls]})
    except TypeError as e:
        raise ProtocolError(f"bad {cls.__name__}: {e}") from e
