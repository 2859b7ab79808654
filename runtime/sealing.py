"""Sealed storage: the AES-256-GCM envelope for checkpoints, exported models and anything kept at rest.

File layout (all integers big-endian)::

    header  = "FLDSLSL1" ‖ u16 format (1) ‖ key_id[16] ‖ u32 chunk_size ‖ u64 total_length ‖ u64 version
              ‖ base_nonce[12] ‖ u16 len ‖ node_id ‖ u16 len ‖ name
    chunk i = AES-256-GCM(key, nonce_i, plaintext[i·chunk_size : (i+1)·chunk_size], aad_i) ‖ tag[16]
    nonce_i = base_nonce XOR i (in the low 8 bytes)
    aad_i   = header ‖ u64 i ‖ u8 is_last

* Keys: ``key = HKDF-SHA256(root, salt="fldsl-seal/1", info="fldsl seal key\\0" ‖ node_id)``; the root is the
  backend's sealing key (sim: ``sealing.key`` from ``fldsl trust init``; Gramine: ``_sgx_mrenclave``). The
  header's key id is another HKDF output from the same root, so a wrong key is reported as such instead of as
  corruption, without revealing anything about the key.
* What is detected: any bit flip (GCM tag), truncation or a dropped last chunk (chunk count from the
  authenticated total length, ``is_last`` in the AAD), trailing garbage, a wrong key (key id), a file copied
  to another node or logical name (node id / name in the authenticated header, node id in the key), and
  rollback to an older version (version in the authenticated header vs a :class:`VersionStore`).
* Limits (docs/trust.md): the version store is a MAC'd file on the same disk. Without a hardware monotonic
  counter, a host that restores an old data file *together with* the old counter file rolls both back
  undetected; the store only stops replacing one sealed file by an older one on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, overload

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fldsl.runtime.cpu import worker_count

MAGIC = b"FLDSLSL1"
FORMAT_VERSION = 1
DEFAULT_CHUNK = 1 << 20
TAG = 16
_FIXED = struct.Struct(">8sH16sIQQ12s")  # magic, format, key_id, chunk_size, total, version, base_nonce
MAX_CHUNK = 64 << 20
MAX_LABEL = 1024


class SealError(Exception):
    """A sealed file cannot be opened: ``reason`` is a short label, ``str()`` the user-facing message."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def _hkdf(root: bytes, info: bytes, length: int) -> bytes:
    if len(root) < 16:
        raise SealError("bad-key", f"sealing root key too short ({len(root)} bytes, need at least 16)")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"fldsl-seal/1", info=info).derive(root)


def derive_key(root: bytes, node_id: str) -> bytes:
    return _hkdf(root, b"fldsl seal key\0" + node_id.encode(), 32)


def key_id(root: bytes) -> bytes:
    return _hkdf(root, b"fldsl seal key id", 16)


@dataclass(frozen=True)
class SealedHeader:
    format_version: int
    key_id: bytes
    chunk_size: int
    total_length: int
    version: int
    base_nonce: bytes
    node_id: str
    name: str
    raw: bytes

    @property
    def chunks(self) -> int:
        return max(1, -(-self.total_length // self.chunk_size))

    @property
    def sealed_size(self) -> int:
        return len(self.raw) + self.total_length + self.chunks * TAG

    def summary(self) -> dict[str, object]:
        return {
            "format_version": self.format_version,
            "key_id": self.key_id.hex(),
            "chunk_size": self.chunk_size,
            "plaintext_bytes": self.total_length,
            "chunks": self.chunks,
            "version": self.version,
            "node_id": self.node_id,
            "name": self.name,
        }


def _encode_header(
    kid: bytes, chunk_size: int, total: int, version: int, nonce: bytes, node_id: str, name: str
) -> bytes:
    node_b, name_b = node_id.encode(), name.encode()
    if len(node_b) > MAX_LABEL or len(name_b) > MAX_LABEL:
        raise SealError("bad-input", "node id and name must be at most 1024 bytes")
    return (
        _FIXED.pack(MAGIC, FORMAT_VERSION, kid, chunk_size, total, version, nonce)
        + struct.pack(">H", len(node_b))
        + node_b
        + struct.pack(">H", len(name_b))
        + name_b
    )


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SealError("truncated", f"sealed file truncated: {what} needs {n} bytes, found {len(data)}")
    return data


def read_header(f: BinaryIO) -> SealedHeader:
    fixed = _read_exact(f, _FIXED.size, "header")
    magic, fmt, kid, chunk, total, version, nonce = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise SealError("not-sealed", "not an fldsl sealed file (bad magic)")
    if fmt != FORMAT_VERSION:
        raise SealError(
            "format", f"sealed file format {fmt} is not supported (this fldsl reads {FORMAT_VERSION})"
        )
    if not 1 <= chunk <= MAX_CHUNK:
        raise SealError("corrupt", f"sealed file header has an invalid chunk size {chunk}")
    raw = bytearray(fixed)
    labels = []
    for what in ("node id", "name"):
        lb = _read_exact(f, 2, what)
        (n,) = struct.unpack(">H", lb)
        if n > MAX_LABEL:
            raise SealError("corrupt", f"sealed file header: {what} length {n} is invalid")
        value = _read_exact(f, n, what)
        raw += lb + value
        labels.append(value.decode("utf-8", "replace"))
    return SealedHeader(fmt, kid, chunk, total, version, nonce, labels[0], labels[1], bytes(raw))


def read_header_file(path: Path | str) -> SealedHeader:
    with open(path, "rb") as f:
        return read_header(f)


def _nonce(base: bytes, i: int) -> bytes:
    return base[:4] + (int.from_bytes(base[4:], "big") ^ i).to_bytes(8, "big")


def _aad(header: bytes, i: int, last: bool) -> bytes:
    return header + struct.pack(">QB", i, 1 if last else 0)


class _Source:
    """Chunks of the input as memoryviews: slices of an in-memory buffer, or reads into one reused buffer
    (fresh 1 MiB allocations per chunk cost more than AES-GCM itself)."""

    def __init__(self, data: memoryview | None, f: io.BufferedIOBase | None, bufsize: int) -> None:
        self.data, self.f, self.pos = data, f, 0
        self.buf = memoryview(bytearray(bufsize)) if f is not None else None

    def take(self, n: int) -> memoryview:
        if self.data is not None:
            out = self.data[self.pos : self.pos + n]
            self.pos += len(out)
            return out
        assert self.f is not None and self.buf is not None
        got = 0
        while got < n:
            r = self.f.readinto(self.buf[got:n])
            if not r:
                break
            got += r
        return self.buf[:got]

    def remaining(self) -> int:
        if self.data is not None:
            return len(self.data) - self.pos
        assert self.f is not None
        return os.fstat(self.f.fileno()).st_size - self.f.tell()

    def at_end(self) -> bool:
        if self.data is not None:
            return self.pos >= len(self.data)
        assert self.f is not None
        return not self.f.read(1)


def _seal_stream(
    src: _Source,
    total: int,
    out: BinaryIO | None,
    *,
    key: bytes,
    node_id: str,
    name: str,
    version: int,
    chunk_size: int,
) -> bytearray | None:
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise SealError("bad-input", f"chunk size must be 1..{MAX_CHUNK}")
    if version < 0:
        raise SealError("bad-input", "version must be >= 0")
    nonce = os.urandom(12)
    header = _encode_header(key_id(key), chunk_size, total, version, nonce, node_id, name)
    aead = AESGCM(derive_key(key, node_id))
    n = max(1, -(-total // chunk_size))
    buf: bytearray | None = None
    if out is None:  # in memory: encrypt straight into the final buffer
        buf = bytearray(len(header) + total + n * TAG)
        view = memoryview(buf)
        view[: len(header)] = header
    else:
        out.write(header)
        cbuf = memoryview(bytearray(chunk_size + TAG))
    if out is None:
        assert src.data is not None
        data, base = src.data, len(header)

        def seal_chunk(i: int) -> None:
            size = min(chunk_size, total - i * chunk_size)
            at = base + i * (chunk_size + TAG)
            aead.encrypt_into(_nonce(nonce, i), data[i * chunk_size : i * chunk_size + size],
                              _aad(header, i, i == n - 1), view[at : at + size + TAG])

        _each_chunk(n, seal_chunk)
        return buf
    for i in range(n):
        expected = min(chunk_size, total - i * chunk_size)
        piece = src.take(expected)
        if len(piece) != expected:
            raise SealError("bad-input", "source file changed size while it was being sealed")
        aead.encrypt_into(_nonce(nonce, i), piece, _aad(header, i, i == n - 1), cbuf[: expected + TAG])
        out.write(cbuf[: expected + TAG])
    return buf


# Chunks are independent AEAD messages and ``cryptography`` releases the GIL inside AES-GCM, so an in-memory
# seal/unseal of a large buffer uses every core (2.3 -> 4 GB/s on this 2-core machine); small ones stay on
# the calling thread, where a pool would cost more than it saves.
_PARALLEL_MIN_CHUNKS = 16


def _each_chunk(n: int, fn: Callable[[int], None]) -> None:
    workers = worker_count(8)
    if n < _PARALLEL_MIN_CHUNKS or workers < 2:
        for i in range(n):
            fn(i)
        return
    per = -(-n // workers)

    def run(lo: int) -> None:
        for i in range(lo, min(n, lo + per)):
            fn(i)

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(run, lo) for lo in range(0, n, per)]:
            f.result()  # re-raises the first failure (e.g. InvalidTag) in the caller


def seal_bytes(
    data: bytes, *, key: bytes, node_id: str, name: str, version: int, chunk_size: int = DEFAULT_CHUNK
) -> bytearray:
    """Seal in memory. Returns a bytearray (bytes-like) to avoid copying hundreds of MB once more."""
    view = memoryview(data).cast("B")
    out = _seal_stream(
        _Source(view, None, 0),
        len(view),
        None,
        key=key,
        node_id=node_id,
        name=name,
        version=version,
        chunk_size=chunk_size,
    )
    assert out is not None
    return out


@contextlib.contextmanager
def atomic_output(dst: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write ``dst`` through a temporary sibling that is fsync'd and renamed over it only when the body
    completes; on any failure the temporary file is removed and ``dst`` is untouched. ``mode`` 0o600 for
    plaintext (a decrypted model is readable by its owner only); a link planted at the temporary name is
    refused, not followed."""
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with open(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)


def seal_file(
    src: Path | str | bytes | bytearray | memoryview,
    dst: Path | str,
    *,
    key: bytes,
    node_id: str,
    name: str,
    version: int,
    chunk_size: int = DEFAULT_CHUNK,
) -> Path:
    """Seal bytes or a file to ``dst`` (written to a temporary file, then atomically renamed)."""
    dst = Path(dst)
    with atomic_output(dst) as out:
        if isinstance(src, (bytes, bytearray, memoryview)):
            view = memoryview(src).cast("B")
            _seal_stream(_Source(view, None, 0), len(view), out, key=key, node_id=node_id, name=name,
                         version=version, chunk_size=chunk_size)
        else:
            with open(src, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                _seal_stream(_Source(None, f, chunk_size), total, out, key=key, node_id=node_id, name=name,
                             version=version, chunk_size=chunk_size)
    return dst


def _check_header(
    h: SealedHeader, *, key: bytes, node_id: str, name: str, min_version: int | None, version: int | None
) -> None:
    if h.key_id != key_id(key):
        raise SealError(
            "wrong-key",
            "wrong key: this file was sealed with another sealing key "
            "(another deployment's trust dir, or another enclave's sealing key)",
        )
    if h.node_id != node_id:
        raise SealError("wrong-node", f"this file is sealed for node {h.node_id!r}, not {node_id!r}")
    if h.name != name:
        raise SealError("wrong-name", f"this file holds {h.name!r}, not {name!r} (files swapped?)")
    if version is not None and h.version != version:
        raise SealError("wrong-version", f"expected version {version}, the file holds version {h.version}")
    if min_version is not None and h.version < min_version:
        raise SealError(
            "rollback",
            f"rollback detected: file has version {h.version}, but version {min_version} was already "
            "written — an older copy was restored",
        )


def _unseal_stream(h: SealedHeader, src: _Source, out: BinaryIO | None, *, key: bytes) -> bytearray | None:
    n = h.chunks
    # Check the (not yet authenticated) length against the real size before allocating anything for it.
    expected, remaining = h.total_length + n * TAG, src.remaining()
    if remaining < expected:
        raise SealError(
            "truncated",
            f"sealed file truncated: {remaining} bytes of chunks where the header announces {expected} "
            "(a chunk is missing, or the header was modified)",
        )
    if remaining > expected:
        raise SealError("tampered", "unexpected data after the last chunk of the sealed file")
    aead = AESGCM(derive_key(key, h.node_id))

    def size_of(i: int) -> int:
        return min(h.chunk_size, h.total_length - i * h.chunk_size) if h.total_length else 0

    def open_chunk(i: int, ct: memoryview, dest: memoryview) -> None:
        try:
            aead.decrypt_into(_nonce(h.base_nonce, i), ct, _aad(h.raw, i, i == n - 1), dest)
        except InvalidTag:
            raise SealError(
                "tampered",
                f"authentication failed in chunk {i + 1} of {n}: the file was modified or corrupted",
            ) from None

    buf = bytearray(h.total_length) if out is None else None
    oview = memoryview(buf) if buf is not None else None
    if oview is not None and src.data is not None:
        # All in memory: the length check above fixed every chunk's offset, so chunks open independently (in
        # parallel for large buffers); a failure reports the lowest failing chunk, as the sequential loop did.
        data, base = src.data, src.pos

        def unseal_chunk(i: int) -> None:
            size, at = size_of(i), base + i * (h.chunk_size + TAG)
            open_chunk(i, data[at : at + size + TAG], oview[i * h.chunk_size : i * h.chunk_size + size])

        _each_chunk(n, unseal_chunk)
        src.pos = base + expected
    else:
        pbuf = memoryview(bytearray(h.chunk_size)) if oview is None else None
        for i in range(n):
            size = size_of(i)
            ct = src.take(size + TAG)
            if len(ct) != size + TAG:
                raise SealError(
                    "truncated",
                    f"sealed file truncated: chunk {i + 1} of {n} is missing or short "
                    f"({h.total_length} plaintext bytes expected)",
                )
            if oview is not None:
                dest = oview[i * h.chunk_size : i * h.chunk_size + size]
            else:
                assert pbuf is not None  # made above exactly when there is no output buffer
                dest = pbuf[:size]
            open_chunk(i, ct, dest)
            if out is not None:
                out.write(dest)
    if not src.at_end():
        raise SealError("tampered", "unexpected data after the last chunk of the sealed file")
    return buf


def unseal_bytes(
    blob: bytes,
    *,
    key: bytes,
    node_id: str,
    name: str,
    min_version: int | None = None,
    version: int | None = None,
) -> bytearray:
    import io

    view = memoryview(blob).cast("B")
    h = read_header(io.BytesIO(view[: _FIXED.size + 2 * (2 + MAX_LABEL)]))
    _check_header(h, key=key, node_id=node_id, name=name, min_version=min_version, version=version)
    src = _Source(view, None, 0)
    src.pos = len(h.raw)
    out = _unseal_stream(h, src, None, key=key)
    assert out is not None
    return out


@overload
def unseal_file(src: Path | str, dst: None = None, *, key: bytes, node_id: str, name: str,
                min_version: int | None = None, version: int | None = None) -> bytearray: ...
@overload
def unseal_file(src: Path | str, dst: Path | str, *, key: bytes, node_id: str, name: str,
                min_version: int | None = None, version: int | None = None) -> SealedHeader: ...
def unseal_file(
    src: Path | str,
    dst: Path | str | None = None,
    *,
    key: bytes,
    node_id: str,
    name: str,
    min_version: int | None = None,
    version: int | None = None,
) -> bytearray | SealedHeader:
    """Open a sealed file. Without ``dst`` returns the plaintext; with ``dst`` streams it there (via a
    temporary file renamed only after every chunk authenticated) and returns the header."""
    with open(src, "rb") as f:
        h = read_header(f)
        _check_header(h, key=key, node_id=node_id, name=name, min_version=min_version, version=version)
        source = _Source(None, f, h.chunk_size + TAG)
        if dst is None:
            out = _unseal_stream(h, source, None, key=key)
            assert out is not None
            return out
        # Plaintext of a model or checkpoint: readable by its owner only.
        with atomic_output(Path(dst), mode=0o600) as fout:
            _unseal_stream(h, source, fout, key=key)
        return h


class _Discard:
    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def verify_file(src: Path | str, *, key: bytes, node_id: str, name: str) -> SealedHeader:
    """Authenticate every chunk of a sealed file without keeping the plaintext (for ``fldsl inspect``)."""
    with open(src, "rb") as f:
        h = read_header(f)
        _check_header(h, key=key, node_id=node_id, name=name, min_version=None, version=None)
        _unseal_stream(h, _Source(None, f, h.chunk_size + TAG), _Discard(), key=key)  # type: ignore[arg-type]
    return h


class VersionStore:
    """Per-node monotonic version counters in a MAC'd JSON file (see the module docstring for its limits)."""

    FORMAT = "fldsl.versions/1"

    def __init__(self, path: Path | str, *, key: bytes, node_id: str) -> None:
        self.path = Path(path)
        self.node_id = node_id
        self._mac_key = _hkdf(key, b"fldsl version store\0" + node_id.encode(), 32)

    def _mac(self, counters: dict[str, int]) -> str:
        body = json.dumps({"format": self.FORMAT, "node": self.node_id, "counters": counters}, sort_keys=True)
        return hmac.new(self._mac_key, body.encode(), hashlib.sha256).hexdigest()

    def _load(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            counters = {str(k): int(v) for k, v in doc["counters"].items()}
            mac = str(doc["mac"])
            node = doc["node"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SealError("counter-corrupt", f"{self.path}: version store is unreadable") from None
        if node != self.node_id or not hmac.compare_digest(mac, self._mac(counters)):
            raise SealError(
                "counter-tampered",
                f"{self.path}: version store failed its integrity check "
                "(edited, or belongs to another node or key)",
            )
        return counters

    def get(self, name: str) -> int:
        """The highest version recorded for ``name`` (0 if never written)."""
        return self._load().get(name, 0)

    def next(self, name: str) -> int:
        return self.get(name) + 1

    def advance(self, name: str, version: int) -> None:
        counters = self._load()
        if version < counters.get(name, 0):
            raise SealError(
                "rollback", f"version {version} of {name!r} is older than recorded {counters[name]}"
            )
        counters[name] = version
        doc = {"format": self.FORMAT, "node": self.node_id, "counters": counters, "mac": self._mac(counters)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
        os.replace(tmp, self.path)


class LineSealer:
    """AES-256-GCM for one short record at a time (the audit record: a line per message, appended as the
    run goes, so a crash loses at most the line being written; a whole-file envelope would lose the file).

    Same keys as the file envelope (``derive_key`` / ``key_id`` of the backend's sealing root). Each line is
    ``base64(nonce[12] ‖ ciphertext ‖ tag)`` with ``aad = label ‖ 0 ‖ node_id ‖ 0 ‖ chain``: a line moved to
    another node's or another link's file does not open there.
    """

    def __init__(self, root: bytes, node_id: str, label: bytes) -> None:
        self._aead = AESGCM(derive_key(root, node_id))
        self.key_id = key_id(root).hex()
        self._prefix = label + b"\0" + node_id.encode() + b"\0"

    def seal(self, chain: str, data: bytes) -> bytes:
        import base64

        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, data, self._prefix + chain.encode()))

    def open(self, chain: str, line: bytes) -> bytes:
        """The plaintext, or ``SealError("tampered")`` if the line was altered, cut or moved."""
        import base64
        import binascii

        try:
            raw = base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise SealError("tampered", "not a sealed record line (bad base64)") from None
        if len(raw) < 12 + TAG:
            raise SealError("tampered", "sealed record line too short")
        try:
            return self._aead.decrypt(raw[:12], raw[12:], self._prefix + chain.encode())
        except InvalidTag:
            raise SealError("tampered", "sealed record line does not open: altered, or from another "
                            "file or node") from None
