"""The receiver's checks of a sender's headers against the reservation they claim: pure functions.

Each returns None for a header the receiver accepts, or the reason it refuses it, one line
that ends up in the transfer's TransferFailed and in the CANCEL the sender gets. No UCX, no
loop: the receiver (receiver.py) decides what a refusal does to the connection and the
reservation.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Protocol

from baton.kvtransfer import protocol
from baton.kvtransfer.layout import KVLayout


class Reservation(Protocol):
    """What the receiver expects for one reservation (an IncomingTransfer is one)."""

    request_id: str
    layout: KVLayout

    @property
    def filling(self) -> bool:
        """A sender's PUSH_BEGIN has already claimed it."""


def check_push_begin(
    msg: protocol.PushBegin, reservation: Reservation | None, request_open: bool
) -> str | None:
    """`reservation`: the one `msg.reservation_id` names, None if the receiver has none by that
    id. `request_open`: the connection already carries a transfer of `msg.request_id`."""
    if request_open:
        return "second PUSH_BEGIN for the request"
    if reservation is None:
        return f"unknown reservation {msg.reservation_id} (expired, cancelled or never made)"
    if reservation.request_id != msg.request_id:
        return f"reservation {msg.reservation_id} belongs to request {reservation.request_id}"
    if reservation.filling:
        return f"reservation {msg.reservation_id} is already being filled"
    want = reservation.layout
    if (msg.num_layers, tuple(msg.layer_shape), msg.dtype, msg.layer_nbytes) != (
        want.num_layers,
        want.layer_shape,
        want.dtype_name,
        want.layer_nbytes,
    ):
        reason = (
            f"sender pushes {msg.num_layers} x {msg.layer_shape} {msg.dtype}, "
            f"reservation expects {want.num_layers} x {list(want.layer_shape)} {want.dtype_name}"
        )
        if msg.dtype != want.dtype_name:
            # e.g. a prefill pod with --kv-cache-dtype fp8 and a decode pod without: refused,
            # not converted (converting would spend the bytes FP8 saves, or lose precision)
            reason += ": KV dtype mismatch, start both pods with the same --kv-cache-dtype and --dtype"
        return reason
    return None


def check_layer(
    msg: protocol.Layer, layout: KVLayout, received: Set[int], in_flight: Set[int]
) -> str | None:
    """A LAYER header of a transfer that has `received` these layers and is receiving
    `in_flight` ones: its bytes must match its layers, each new and in range."""
    if msg.nbytes != len(msg.layers) * layout.layer_nbytes:
        return f"LAYER of {msg.nbytes} bytes for {len(msg.layers)} layers of {layout.layer_nbytes}"
    if any(
        not 0 <= i < layout.num_layers or i in received or i in in_flight for i in msg.layers
    ) or len(set(msg.layers)) != len(msg.layers):
        return f"bad or repeated layer indices {msg.layers}"
    return None


def check_done(layout: KVLayout, received: Set[int], in_flight: Set[int]) -> str | None:
    """DONE closes the sender's stream: every layer's header must have come before it (the
    payloads of those `in_flight` may still be landing)."""
    missing = set(range(layout.num_layers)) - received - in_flight
    if missing:
        return f"DONE without layers {sorted(missing)}"
    return None
