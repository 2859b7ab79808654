"""Typed message keys: every message of a link travels under ``(flow, key)``; this module is the key space.

A key is ``(namespace, round, index)``: what kind of message it is, and which one. On the wire it is one
uint64 (the frame's ``step``), laid out so that namespaces can never overlap (each has its own range, checked
when a key is made)::

    namespace        wire value                        round              index
    STEP             index                             -                  training step   < 2**48
    PIECE            2**48 + round * 2**16 + index     FedAvg round       piece           < 2**16
    CONTROL          2**50 + index                     -                  Control kind    < 1000
    ROLLBACK         2**50 + 1000 + index              -                  restart count   < 2**36 - 1000
    LANDED           2**50 + 2**36 + index             -                  checkpoint step < 2**40 - 2**36
    RESUME_WEIGHTS   2**50 + 2**40 + index             -                  agreed step     < 2**50 - 2**40
    EVAL             2**52 + round * 2**24 + index     epoch              batch           < 2**24
    DATA             2**54 + index                     -                  chunk (0 header, 1 + i)

The values are the ones the roles used when they allocated integers by hand (``CTRL_BASE = 1 << 50``, ...),
so a node built from either speaks to the other; ``tests/transport/test_keys.py`` holds the old constants to
them. :class:`MessageKey` is an ``int``: the transport and the roles pass it where they passed the integer,
and it says what it is in a refusal (``repr``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class Namespace(IntEnum):
    STEP = 0
    PIECE = 1
    CONTROL = 2
    ROLLBACK = 3
    LANDED = 4
    RESUME_WEIGHTS = 5
    EVAL = 6
    DATA = 7


class Control(IntEnum):
    """The JSON control messages between roles (the index of a ``CONTROL`` key)."""

    RESUME = 1  # node -> coordinator: the checkpoint steps it holds
    RESUME_AGREED = 2  # coordinator -> node: the step everybody continues from
    ALIGN = 3  # vertical, predict: active -> passive: train / holdout positions (a chunked transfer's base)
    INFO = 4  # horizontal: worker -> server: number of rows, input specs
    SCHEDULE = 5  # horizontal: server -> worker: steps per epoch, rounds
    PREDICT = 7  # predict: both ways, "this node is predicting"
    DATA_RECEIVED = 8  # distributed: worker -> chief: "I have my whole shard"


class _Layout(NamedTuple):
    base: int
    round_stride: int  # 0: the namespace has no rounds
    index_limit: int  # exclusive
    round_limit: int  # exclusive (1 without rounds)


_CTRL = 1 << 50
LAYOUT: dict[Namespace, _Layout] = {
    Namespace.STEP: _Layout(0, 0, 1 << 48, 1),
    Namespace.PIECE: _Layout(1 << 48, 1 << 16, 1 << 16, ((1 << 50) - (1 << 48)) >> 16),
    Namespace.CONTROL: _Layout(_CTRL, 0, 1000, 1),
    Namespace.ROLLBACK: _Layout(_CTRL + 1000, 0, (1 << 36) - 1000, 1),
    Namespace.LANDED: _Layout(_CTRL + (1 << 36), 0, (1 << 40) - (1 << 36), 1),
    Namespace.RESUME_WEIGHTS: _Layout(_CTRL + (1 << 40), 0, (1 << 50) - (1 << 40), 1),
    Namespace.EVAL: _Layout(1 << 52, 1 << 24, 1 << 24, ((1 << 54) - (1 << 52)) >> 24),
    Namespace.DATA: _Layout(1 << 54, 0, (1 << 63) - (1 << 54), 1),
}
# Keys below this are training steps: the link reports the highest one its role read (where the role is).
STEP_LIMIT = LAYOUT[Namespace.STEP].index_limit


class MessageKey(int):
    """``(namespace, round, index)`` as the uint64 the wire carries."""

    namespace: Namespace
    round: int
    index: int

    def __new__(cls, namespace: Namespace, round: int = 0, index: int = 0) -> MessageKey:
        lay = LAYOUT[namespace]
        if not 0 <= index < lay.index_limit:
            raise ValueError(f"{namespace.name} key: index {index} outside [0, {lay.index_limit})")
        if not 0 <= round < lay.round_limit:
            raise ValueError(f"{namespace.name} key: round {round} outside [0, {lay.round_limit})")
        key = super().__new__(cls, lay.base + round * lay.round_stride + index)
        key.namespace, key.round, key.index = namespace, round, index
        return key

    def __repr__(self) -> str:
        rnd = f" round {self.round}" if LAYOUT[self.namespace].round_stride else ""
        return f"{self.namespace.name.lower()}{rnd} #{self.index}"

    def chunk(self, i: int) -> MessageKey:
        """The key ``i`` places on in the same namespace and round (a chunked transfer's parts)."""
        return MessageKey(self.namespace, self.round, self.index + i)


def decode(wire: int) -> MessageKey:
    """The typed key of a wire value (for messages and checks); ValueError where no namespace has it."""
    for ns, lay in sorted(LAYOUT.items(), key=lambda kv: -kv[1].base):
        if wire >= lay.base:
            off = wire - lay.base
            rnd, idx = divmod(off, lay.round_stride) if lay.round_stride else (0, off)
            return MessageKey(ns, rnd, idx)
    raise ValueError(f"negative message key {wire}")


def step(n: int) -> MessageKey:
    return MessageKey(Namespace.STEP, 0, n)


def piece(round: int, p: int) -> MessageKey:
    return MessageKey(Namespace.PIECE, round, p)


def control(kind: Control) -> MessageKey:
    return MessageKey(Namespace.CONTROL, 0, int(kind))


def rollback(n: int) -> MessageKey:
    return MessageKey(Namespace.ROLLBACK, 0, n)


def landed(step: int) -> MessageKey:
    return MessageKey(Namespace.LANDED, 0, step)


def resume_weights(step: int) -> MessageKey:
    return MessageKey(Namespace.RESUME_WEIGHTS, 0, step)


def eval_batch(epoch: int, k: int) -> MessageKey:
    return MessageKey(Namespace.EVAL, epoch, k)


def data(i: int = 0) -> MessageKey:
    return MessageKey(Namespace.DATA, 0, i)
