"""The receiver's header checks on plain data, without UCX: each header it accepts, and each
refusal with the reason the sender and the decode pod read."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from baton.kvtransfer import protocol
from baton.kvtransfer.header_checks import check_done, check_layer, check_push_begin
from baton.kvtransfer.layout import KVLayout

SHAPE = (2, 16, 2, 8)
LAYOUT = KVLayout(4, SHAPE, torch.bfloat16)
NBYTES = 2 * 16 * 2 * 8 * 2  # 1024
WANT = "reservation expects 4 x [2, 16, 2, 8] bfloat16"


@dataclass
class Reservation:
    request_id: str = "req"
    layout: KVLayout = LAYOUT
    filling: bool = False


def push_begin(**over) -> protocol.PushBegin:
    fields = dict(
        request_id="req",
        reservation_id="res",
        num_layers=4,
        layer_shape=list(SHAPE),
        dtype="bfloat16",
        layer_nbytes=NBYTES,
    )
    return protocol.PushBegin(**(fields | over))


def layer(layers, nbytes=None) -> protocol.Layer:
    return protocol.Layer("req", 7, layers, len(layers) * NBYTES if nbytes is None else nbytes)


def test_the_layout_says_what_push_begin_says():
    assert LAYOUT.layer_shape == SHAPE and LAYOUT.dtype_name == "bfloat16"
    assert LAYOUT.layer_nbytes == NBYTES
    assert KVLayout(4, list(SHAPE), torch.bfloat16) == LAYOUT, "a list shape is a tuple"
    with pytest.raises(protocol.ProtocolError, match="unsupported dtype"):
        KVLayout(4, SHAPE, torch.complex64)


def test_a_push_begin_that_matches_its_reservation_is_accepted():
    assert check_push_begin(push_begin(), Reservation(), request_open=False) is None


@pytest.mark.parametrize(
    ("msg", "reservation", "request_open", "reason"),
    [
        (push_begin(), Reservation(), True, "second PUSH_BEGIN for the request"),
        (
            push_begin(),
            None,
            False,
            "unknown reservation res (expired, cancelled or never made)",
        ),
        (push_begin(), Reservation("other"), False, "reservation res belongs to request other"),
        (push_begin(), Reservation(filling=True), False, "reservation res is already being filled"),
        (
            push_begin(num_layers=5),
            Reservation(),
            False,
            f"sender pushes 5 x [2, 16, 2, 8] bfloat16, {WANT}",
        ),
        (
            push_begin(layer_shape=[2, 32, 2, 8], layer_nbytes=2 * NBYTES),
            Reservation(),
            False,
            f"sender pushes 4 x [2, 32, 2, 8] bfloat16, {WANT}",
        ),
        (
            push_begin(dtype="float16"),
            Reservation(),
            False,
            f"sender pushes 4 x [2, 16, 2, 8] float16, {WANT}: KV dtype mismatch, "
            "start both pods with the same --kv-cache-dtype and --dtype",
        ),
        (  # same shape and dtype, but the byte count disagrees
            push_begin(layer_nbytes=NBYTES + 2),
            Reservation(),
            False,
            f"sender pushes 4 x [2, 16, 2, 8] bfloat16, {WANT}",
        ),
    ],
)
def test_a_push_begin_that_does_not_match_is_refused_with_its_reason(
    msg, reservation, request_open, reason
):
    assert check_push_begin(msg, reservation, request_open) == reason


def test_a_second_push_begin_is_refused_before_anything_else():
    """The connection already carries the request: refused even with no reservation."""
    assert check_push_begin(push_begin(), None, True) == "second PUSH_BEGIN for the request"


@pytest.mark.parametrize(
    ("layers", "received", "in_flight"),
    [([0], set(), set()), ([3, 1], {0}, set()), ([2], {0}, {1, 3}), ([0, 1, 2, 3], set(), set())],
)
def test_a_layer_header_of_new_layers_in_range_is_accepted(layers, received, in_flight):
    assert check_layer(layer(layers), LAYOUT, received, in_flight) is None


@pytest.mark.parametrize(
    ("msg", "received", "in_flight", "reason"),
    [
        (layer([0], nbytes=NBYTES - 1), set(), set(), "LAYER of 1023 bytes for 1 layers of 1024"),
        (layer([0, 1], nbytes=NBYTES), set(), set(), "LAYER of 1024 bytes for 2 layers of 1024"),
        (layer([4]), set(), set(), "bad or repeated layer indices [4]"),
        (layer([-1]), set(), set(), "bad or repeated layer indices [-1]"),
        (layer([1]), {1}, set(), "bad or repeated layer indices [1]"),
        (layer([0, 2]), set(), {2}, "bad or repeated layer indices [0, 2]"),
        (layer([3, 3]), set(), set(), "bad or repeated layer indices [3, 3]"),
    ],
)
def test_a_bad_layer_header_is_refused_with_its_reason(msg, received, in_flight, reason):
    assert check_layer(msg, LAYOUT, received, in_flight) == reason


def test_the_byte_count_is_checked_before_the_indices():
    assert check_layer(layer([9], nbytes=1), LAYOUT, set(), set()).startswith("LAYER of 1 bytes")


def test_done_after_every_layer_header_is_accepted_even_with_payloads_landing():
    assert check_done(LAYOUT, {0, 1, 2, 3}, set()) is None
    assert check_done(LAYOUT, {0, 2}, {1, 3}) is None


def test_done_before_some_layer_headers_names_the_missing_layers():
    assert check_done(LAYOUT, {0}, {2}) == "DONE without layers [1, 3]"
    assert check_done(LAYOUT, set(), set()) == "DONE without layers [0, 1, 2, 3]"
