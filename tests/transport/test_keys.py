"""Typed message keys: one layout, no overlaps, and the same wire values the roles allocated by hand."""

from __future__ import annotations

import itertools

import pytest

from fldsl.runtime.transport import keys
from fldsl.runtime.transport.keys import LAYOUT, Control, MessageKey, Namespace


def test_namespaces_do_not_overlap() -> None:
    spans = sorted((lay.base, lay.base + max(1, lay.round_limit) * (lay.round_stride or lay.index_limit))
                   for lay in LAYOUT.values())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans
    assert spans[-1][1] <= 1 << 64  # the frame's step is a uint64


def test_same_values_as_the_hand_allocated_constants() -> None:
    """The wire values the roles allocated by hand before the typed keys (``CTRL_BASE = 1 << 50``, ...):
    a node built from either must agree on the wire."""
    ctrl = 1 << 50
    assert keys.control(Control.RESUME) == ctrl + 1
    assert keys.control(Control.RESUME_AGREED) == ctrl + 2
    assert keys.control(Control.ALIGN) == ctrl + 3
    assert keys.control(Control.INFO) == ctrl + 4 and keys.control(Control.SCHEDULE) == ctrl + 5
    assert keys.rollback(3) == ctrl + 1000 + 3
    assert keys.landed(70) == ctrl + (1 << 36) + 70
    assert keys.eval_batch(2, 5) == (1 << 52) + 2 * (1 << 24) + 5
    assert keys.data() == 1 << 54 and keys.data().chunk(4) == (1 << 54) + 4


@pytest.mark.parametrize("key", [keys.step(0), keys.step(12345), keys.piece(7, 3), keys.control(Control.INFO),
                                 keys.rollback(1), keys.landed(9), keys.resume_weights(100),
                                 keys.eval_batch(3, 99), keys.data(17)])
def test_decode_round_trips(key: MessageKey) -> None:
    back = keys.decode(int(key))
    assert (back.namespace, back.round, back.index) == (key.namespace, key.round, key.index)
    assert isinstance(key, int) and int(back) == int(key)


def test_out_of_range_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="PIECE key: index 65536"):
        keys.piece(0, 1 << 16)
    with pytest.raises(ValueError, match="STEP key"):
        keys.step(1 << 48)
    with pytest.raises(ValueError, match="CONTROL key: round 1"):
        MessageKey(Namespace.CONTROL, 1, 1)
    with pytest.raises(ValueError):
        keys.decode((1 << 51) + 5)  # between RESUME_WEIGHTS and EVAL: no namespace has it
    assert repr(keys.piece(2, 1)) == "piece round 2 #1"
