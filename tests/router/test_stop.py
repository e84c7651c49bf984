"""Stop strings over streamed text: never past a match, hold back only a possible partial match."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from baton.router.stop import StopStrings


def feed(stops, pieces):
    s = StopStrings(stops)
    out = [s.push(p) for p in pieces]
    if not s.stopped:
        out.append(s.push("", final=True))
    return out, s.stopped


def test_split_across_pieces():
    out, stopped = feed(["STOP"], ["hello S", "TO", "P world"])
    assert stopped and "".join(out) == "hello "
    assert out[0] == "hello "  # "S" held back: it may start "STOP"
    assert out[1] == ""


def test_partial_match_released_when_it_fails():
    out, stopped = feed(["STOP"], ["a ST", "x"])
    assert not stopped and out == ["a ", "STx", ""]


def test_earliest_of_several_stops_and_final_flush():
    out, stopped = feed(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert stopped and "".join(out) == "hel"
    out, stopped = feed(["zz"], ["abz"])
    assert not stopped and out == ["ab", "z"]


def test_no_stops_passes_everything_through():
    out, _ = feed([], ["a", "b"])
    assert out == ["a", "b", ""]


@given(
    text=st.text(alphabet="abcST ", max_size=40),
    stops=st.lists(st.text(alphabet="abcST", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stream_equals_batch(text, stops, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = feed(stops, pieces)
    # Stops apply as text arrives: the first piece that completes a match decides, and the
    # text is cut at the earliest match start within what has arrived by then.
    want, hit = text, False
    for b in bounds[1:]:
        starts = [i for i in (text[:b].find(s) for s in stops) if i >= 0]
        if starts:
            want, hit = text[: min(starts)], True
            break
    assert "".join(out) == want and stopped == hit
    assert not any(s in want for s in stops)
    # What was released at any point is a prefix of the final answer: nothing past a stop.
    sent = ""
    for o in out:
        sent += o
        assert want.startswith(sent)
