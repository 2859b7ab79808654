"""Sealed checkpoints: weights, optimiser state, step and alignment, written at agreed step boundaries.

Every node checkpoints at the same global steps (every ``checkpoint_every_steps`` and at each epoch end), so
after a crash the peers can agree on a step they all hold (see :func:`agree_resume_step`). The last two
checkpoints are kept: the lock-step protocols keep peers within one step of each other, so a survivor may be
at most one checkpoint ahead of a restarted peer and must be able to roll back to the matching one.

A checkpoint is one sealed file (``fldsl.runtime.sealing``): the payload is a small JSON header (step,
metadata) followed by an ``.npz`` archive of named numpy arrays (no pickle).

Binding (docs/trust.md, "Sealed storage"). A checkpoint's sealed name is ``checkpoint/<pipeline>/<step>``,
``<pipeline>`` being the pins digest of the compiled pipeline (it changes whenever any plan, policy or
measurement does), and it is sealed for this node. Its version comes from the store's
:class:`~fldsl.runtime.sealing.VersionStore` (one counter of saves per pipeline), and a sealed *state* file
(``state.sealed``, itself version-counted) lists the checkpoints this node offers for resume with their
versions, plus the newest step each peer said it landed. So:

* a checkpoint of another pipeline or node in the folder is refused, naming both digests;
* an older copy of a checkpoint (an earlier save of the same step) fails its version check;
* a deleted newest checkpoint, or a deleted state file, is evidence of rollback
  (:meth:`CheckpointStore.rollback_evidence`), and the peers' records catch a node whose whole folder was
  rolled back (``RoleContext.agree_resume``);
* checkpoints are only ever deleted by this store's retention, after a newer one landed: a resume agreement
  only changes which ones are offered.
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
STATE_FILE = "state.sealed"
VERSIONS_FILE = "versions.json"
_STATE_FORMAT = "fldsl.checkpoints/1"
# A state lists a handful of steps and one entry per peer; anything bigger was not written by us.
_MAX_STATE_ENTRIES = 4096


class CheckpointError(Exception):
    """A checkpoint cannot be read (tampered, wrong key, truncated, wrong node)."""


class ForeignCheckpoint(CheckpointError):
    """A file in the store belongs to another pipeline (pins digest) or another node."""


class RollbackDetected(CheckpointError):
    """This node's checkpoints are older than what it, or its peers, recorded: one was deleted or an older
    copy restored. Resuming would silently roll every node back."""


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
    np.savez(buf, **ckpt.arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its allow_pickle
    return buf.getbuffer()


def decode(data: bytes | bytearray) -> Checkpoint:
    from fldsl.runtime.bundle import BundleError, read_npz

    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise CheckpointError("not an fldsl checkpoint payload")
    (hlen,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        header = json.loads(data[start:start + hlen])
        archive = data[start + hlen:]
        # Stored members only, headers matching their sizes: the arrays take no more than the payload.
        arrays = read_npz(archive, limit=len(archive), what="checkpoint archive")
    except (ValueError, KeyError, BundleError) as e:
        raise CheckpointError(f"checkpoint payload is malformed: {e}") from e
    return Checkpoint(step=int(header["step"]), arrays=arrays, meta=header.get("meta", {}))


def short(digest: str) -> str:
    """How messages name a digest: enough hex to tell two apart."""
    return f"{digest[:16]}…"


def _logical(pipeline: str, step: int) -> str:
    return f"checkpoint/{pipeline}/{step}"


def _state_name(pipeline: str) -> str:
    return f"checkpoint-state/{pipeline}"


def _pipeline_in(name: str) -> str | None:
    """The pipeline digest a sealed name binds (None: a name without one, e.g. an older fldsl's)."""
    kind, _, rest = name.partition("/")
    if kind == "checkpoint-state":
        return rest or None
    if kind == "checkpoint" and "/" in rest:
        return rest.split("/", 1)[0]
    return None


@dataclass
class _State:
    """What the sealed state file holds."""

    steps: dict[int, int] = field(default_factory=dict)  # offered checkpoint step -> version of its file
    peers: dict[str, int] = field(default_factory=dict)  # newest step each peer said it landed

    def encode(self, node: str, pipeline: str) -> bytes:
        doc = {"format": _STATE_FORMAT, "node": node, "pipeline": pipeline,
               "steps": {str(s): v for s, v in sorted(self.steps.items())},
               "peers": dict(sorted(self.peers.items()))}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, where: Path) -> _State:
        try:
            doc = json.loads(data)
            if doc["format"] != _STATE_FORMAT:
                raise ValueError(f"format {doc['format']!r}")
            steps = {_nonneg(k): _nonneg(v) for k, v in doc["steps"].items()}
            peers = {str(k): _nonneg(v) for k, v in doc["peers"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{where}: the checkpoint state is malformed: {e}") from e
        if len(steps) + len(peers) > _MAX_STATE_ENTRIES:
            raise CheckpointError(f"{where}: the checkpoint state has implausibly many entries")
        return cls(steps, peers)


def _nonneg(value: object) -> int:
    n = int(value) if isinstance(value, str) else value
    if type(n) is not int or n < 0:
        raise ValueError(f"{value!r} is not a step or version")
    return n


class CheckpointStore:
    """The sealed checkpoints of one node in ``<run_dir>/checkpoints/<node>/``.

    ``pipeline_digest`` (the pins digest) binds every file to this compiled pipeline; a store made without
    one must be bound (:meth:`bind`) before it is used, so nothing is read or written unbound.
    """

    def __init__(self, directory: Path, *, node_id: str, key: bytes, keep: int = 2,
                 pipeline_digest: str | None = None) -> None:
        from fldsl.runtime.sealing import VersionStore

        self.dir = directory
        self.node_id = node_id
        self._key = key
        self.keep = keep
        self._pipeline = pipeline_digest
        self._versions = VersionStore(directory / VERSIONS_FILE, key=key, node_id=node_id)
        self._state: _State | None = None
        self._state_lost = 0  # version of the state file the counters recorded, when the file is gone
        self._dirty = False  # peers' records noted but not sealed yet

    # -- binding --------------------------------------------------------------------------------------------

    @property
    def pipeline_digest(self) -> str | None:
        return self._pipeline

    def bind(self, pipeline_digest: str) -> None:
        if self._pipeline is not None and self._pipeline != pipeline_digest:
            raise CheckpointError(f"{self.dir}: the store is bound to pipeline {short(self._pipeline)}, "
                                  f"not {short(pipeline_digest)}")
        self._pipeline = pipeline_digest

    def _bound(self) -> str:
        if self._pipeline is None:
            raise CheckpointError(f"{self.dir}: the checkpoint store is not bound to a pipeline digest")
        return self._pipeline

    # -- files ----------------------------------------------------------------------------------------------

    def path(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:09d}.sealed"

    def _files(self) -> dict[int, Path]:
        if not self.dir.is_dir():
            return {}
        return {int(m.group(1)): p for p in self.dir.iterdir() if (m := _NAME.match(p.name))}

    def verify_files(self) -> None:
        """Refuse the folder if any checkpoint or state file in it was sealed for another pipeline, node or
        deployment (planted, or copied from another run): header checks only, nothing is decrypted."""
        paths = sorted(self._files().values())
        if (self.dir / STATE_FILE).exists():
            paths.append(self.dir / STATE_FILE)
        for p in paths:
            self._check_owner(p)

    def _check_owner(self, path: Path) -> None:
        from fldsl.runtime import sealing

        pipeline = self._bound()
        try:
            h = sealing.read_header_file(path)
        except (sealing.SealError, OSError) as e:
            raise CheckpointError(f"{path}: not a sealed checkpoint: {e}") from e
        if h.key_id != sealing.key_id(self._key):
            raise ForeignCheckpoint(f"{path}: sealed with another sealing key (another deployment's trust "
                                    "material): refusing it")
        if h.node_id != self.node_id:
            raise ForeignCheckpoint(f"{path}: a checkpoint of node {h.node_id}, not {self.node_id}: "
                                    "refusing it")
        owner = _pipeline_in(h.name)
        if owner != pipeline:
            theirs = f"pins digest {short(owner)}" if owner else "no pipeline digest (an older fldsl)"
            raise ForeignCheckpoint(
                f"{path}: a checkpoint of another pipeline: it is sealed for {theirs}, this pipeline's pins "
                f"digest is {short(pipeline)}; refusing to resume or export it (move it away, or run the "
                "pipeline it belongs to)")

    # -- state ----------------------------------------------------------------------------------------------

    def _counter(self, what: str) -> str:
        return f"{what}/{self._bound()}"

    def _versions_get(self, name: str) -> int:
        from fldsl.runtime.sealing import SealError

        try:
            return self._versions.get(name)
        except SealError as e:
            raise CheckpointError(f"{self.dir}: {e}") from e

    def _load_state(self) -> _State:
        from fldsl.runtime import sealing

        if self._state is not None:
            return self._state
        path = self.dir / STATE_FILE
        recorded = self._versions_get(self._counter("checkpoint-state"))
        if not path.exists():
            self._state, self._state_lost = _State(), recorded
            return self._state
        self._check_owner(path)
        try:
            data = sealing.unseal_file(path, key=self._key, node_id=self.node_id,
                                       name=_state_name(self._bound()), min_version=recorded)
        except sealing.SealError as e:
            raise CheckpointError(f"{path}: cannot unseal the checkpoint state: {e}") from e
        assert isinstance(data, bytearray)
        self._state = _State.decode(bytes(data), path)
        return self._state

    def _write_state(self, state: _State) -> None:
        from fldsl.runtime import sealing

        pipeline = self._bound()
        self.dir.mkdir(parents=True, exist_ok=True)
        counter = self._counter("checkpoint-state")
        version = self._versions.next(counter)
        sealing.seal_file(state.encode(self.node_id, pipeline), self.dir / STATE_FILE, key=self._key,
                          node_id=self.node_id, name=_state_name(pipeline), version=version)
        self._versions.advance(counter, version)
        self._state, self._state_lost, self._dirty = state, 0, False

    # -- what is offered ------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """The checkpoints this node offers for resume (recorded in its state and present on disk)."""
        return sorted(s for s in self._load_state().steps if self.path(s).exists())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def rollback_evidence(self) -> list[str]:
        """Why this node's own records say it was rolled back (empty: they do not)."""
        state = self._load_state()
        out = []
        if self._state_lost:
            out.append(f"its sealed checkpoint state {self.dir / STATE_FILE} is gone, although version "
                       f"{self._state_lost} of it was written")
        out += [f"its checkpoint of step {s} ({self.path(s).name}) is gone, although its sealed state "
                "records it" for s in sorted(state.steps) if not self.path(s).exists()]
        return out

    def peers_seen(self) -> dict[str, int]:
        return dict(self._load_state().peers)

    def note_peer(self, peer: str, step: int) -> None:
        """Record that ``peer`` said it landed ``step`` (kept in memory; the next save or flush seals it)."""
        peers = self._load_state().peers
        if step > peers.get(peer, -1):
            peers[peer] = step
            self._dirty = True

    def flush(self) -> None:
        """Seal the peers' records noted since the last write."""
        if self._dirty and self._state is not None:
            self._write_state(self._state)

    def settle(self, agreed: int | None, peers: list[str]) -> None:
        """The peers agreed to continue from ``agreed`` (None: a fresh start): offer nothing newer, and
        record that every peer holds ``agreed``. No file is deleted here: retention removes the ones no
        longer offered once a newer checkpoint has landed."""
        state = self._load_state()
        if agreed is None:
            new = _State()
        else:
            new = _State({s: v for s, v in state.steps.items() if s <= agreed}, dict.fromkeys(peers, agreed))
        if new != state or self._state_lost:
            self._write_state(new)

    def discard_after(self, step: int) -> None:
        """Stop offering checkpoints newer than ``step`` (their files go at the next save's retention)."""
        state = self._load_state()
        self._write_state(_State({s: v for s, v in state.steps.items() if s <= step},
                                 {p: min(v, step) for p, v in state.peers.items()}))

    # -- save / load ----------------------------------------------------------------------------------------

    def save(self, ckpt: Checkpoint) -> Path:
        from fldsl.runtime import sealing

        pipeline = self._bound()
        state = self._load_state()
        self.dir.mkdir(parents=True, exist_ok=True)
        counter = self._counter("checkpoint")
        version = self._versions.next(counter)
        dst = self.path(ckpt.step)
        # seal_file writes a temporary file and renames it: a crash mid-write never leaves a half checkpoint
        # under the real name. The name binds pipeline and step: a file renamed to another step, or planted
        # from another pipeline, fails to unseal.
        sealing.seal_file(encode(ckpt), dst, key=self._key, node_id=self.node_id,
                          name=_logical(pipeline, ckpt.step), version=version)
        self._versions.advance(counter, version)
        steps = {**state.steps, ckpt.step: version}
        kept = sorted(steps, key=steps.__getitem__)[-self.keep:]  # the newest saves, whatever their steps
        self._write_state(_State({s: steps[s] for s in sorted(kept)}, state.peers))
        self._prune(set(kept))
        return dst

    def _prune(self, kept: set[int]) -> None:
        """Retention: delete this pipeline's checkpoint files that are no longer offered."""
        for step, p in self._files().items():
            if step not in kept:
                p.unlink(missing_ok=True)

    def load(self, step: int) -> Checkpoint:
        from fldsl.runtime import sealing

        path = self.path(step)
        version = self._load_state().steps.get(step)
        if version is None:
            raise CheckpointError(f"{path}: step {step} is not among the checkpoints this node offers")
        self._check_owner(path)
        try:
            data = sealing.unseal_file(path, key=self._key, node_id=self.node_id,
                                       name=_logical(self._bound(), step), version=version)
        except (sealing.SealError, OSError) as e:
            raise CheckpointError(f"{path}: cannot unseal checkpoint: {e}") from e
        assert isinstance(data, bytearray)
        ckpt = decode(data)
        if ckpt.step != step:
            raise CheckpointError(f"{path}: holds step {ckpt.step}, expected {step}")
        return ckpt


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
