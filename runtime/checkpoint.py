"""Sealed checkpoints: weights, optimiser state, step and alignment, written at agreed step boundaries.

Every node checkpoints at the same global steps (every ``checkpoint_every_steps`` and at each epoch end), so
after a crash the peers can agree on a step they all hold (see :func:`agree_resume_step`). The last two
checkpoints are kept: the lock-step protocols keep peers within one step of each other, so a survivor may be
at most one checkpoint ahead of a restarted peer and must be able to roll back to the matching one.

A checkpoint is one sealed file (``fldsl.runtime.sealing``): the payload is a small JSON header (step,
metadata) followed by an ``.npz`` archive of named numpy arrays (no pickle).
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_NAME = re.compile(r"^ckpt-(\d{9})\.sealed$")
_MAGIC = b"FLDSLCK1"


class CheckpointError(Exception):
    """A checkpoint cannot be read (tampered, wrong key, truncated, wrong node)."""


@dataclass
class Checkpoint:
    step: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def encode(ckpt: Checkpoint) -> memoryview:
    """The payload as one buffer: header first, then the archive written straight after it.

    Writing the archive into the buffer that already holds the header (and handing out a view of it) keeps
    one copy of the arrays' bytes alive besides the arrays themselves; ``getvalue()`` plus concatenation made
    two more, i.e. ~300 MB of transient memory for a 94 MB model at every checkpoint.
    """
    header = json.dumps({"step": ckpt.step, "meta": ckpt.meta}, sort_keys=True).encode()
    buf = io.BytesIO()
    buf.write(_MAGIC + struct.pack("<I", len(header)) + header)
    # zipfile then records offsets from the start of the buffer; readers (decode's np.load on the slice
    # after the header) correct for the prepended bytes, as for any zip with a prefix, and payloads of the
    # earlier layout (archive written on its own) decode unchanged.
    np.savez(buf, **ckpt.arrays)
    return buf.getbuffer()


def decode(data: bytes) -> Checkpoint:
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise CheckpointError("not an fldsl checkpoint payload")
    (hlen,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        header = json.loads(data[start:start + hlen])
        with np.load(io.BytesIO(data[start + hlen:]), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"checkpoint payload is malformed: {e}") from e
    return Checkpoint(step=int(header["step"]), arrays=arrays, meta=header.get("meta", {}))


class CheckpointStore:
    """The sealed checkpoints of one node in ``<run_dir>/checkpoints/<node>/``."""

    def __init__(self, directory: Path, *, node_id: str, key: bytes, keep: int = 2) -> None:
        self.dir = directory
        self.node_id = node_id
        self._key = key
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:09d}.sealed"

    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def save(self, ckpt: Checkpoint) -> Path:
        from fldsl.runtime import sealing

        self.dir.mkdir(parents=True, exist_ok=True)
        dst = self.path(ckpt.step)
        tmp = dst.with_suffix(".tmp")
        # The logical name binds the step: a file renamed to another step fails to unseal.
        sealing.seal_file(encode(ckpt), tmp, key=self._key, node_id=self.node_id,
                          name=_logical(ckpt.step), version=ckpt.step + 1)
        tmp.replace(dst)  # atomic: a crash mid-write never leaves a half checkpoint under the real name
        for old in self.steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        return dst

    def load(self, step: int) -> Checkpoint:
        from fldsl.runtime import sealing

        try:
            data = sealing.unseal_file(self.path(step), key=self._key, node_id=self.node_id,
                                       name=_logical(step), version=step + 1)
        except sealing.SealError as e:
            raise CheckpointError(f"{self.path(step)}: cannot unseal checkpoint: {e}") from e
        ckpt = decode(data)
        if ckpt.step != step:
            raise CheckpointError(f"{self.path(step)}: holds step {ckpt.step}, expected {step}")
        return ckpt

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def discard_after(self, step: int) -> None:
        """Drop checkpoints newer than the step the peers agreed to continue from."""
        for s in self.steps():
            if s > step:
                self.path(s).unlink(missing_ok=True)


def _logical(step: int) -> str:
    return f"checkpoint/{step}"


def agree_resume_step(available: list[list[int]]) -> int | None:
    """The newest step every node holds a checkpoint for (None: start fresh).

    Each inner list is one node's checkpoint steps. Lower wins: a node that lost its newer checkpoint forces
    the others back to the newest one they share.
    """
    if not available:
        return None
    common = set(available[0])
    for steps in available[1:]:
        common &= set(steps)
    return max(common) if common else None
