"""Size-bounded reading of ``.npz`` bundles (named numpy arrays in a zip): what a peer sends (alignment
positions, data shards) and what a checkpoint holds.

``np.load`` trusts the archive: a member may be deflate-compressed (about 1000:1 for zeros, so a 1 MB
message can expand to gigabytes), and numpy allocates an array from the shape in the member's ``.npy`` header
before it reads a byte of data. :func:`read_npz` checks everything that decides how much memory the load
takes before ``np.load`` runs: members must be stored uncompressed (fldsl's own writers, ``np.savez``, never
compress), every member's header must describe exactly the bytes the member holds, and the sum must stay
within the caller's limit (computed from the plan: rows times bytes per row). Nothing is decompressed or
allocated for a bundle that fails a check.
"""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np
from numpy.lib import format as npy_format

# Zip and .npy bookkeeping per member: local header + central directory entry + .npy header (numpy pads it
# to 64 or 128 bytes; names are short). Callers add this per member they expect, plus the end record.
MEMBER_OVERHEAD = 1024
ARCHIVE_OVERHEAD = 1024


class BundleError(ValueError):
    """The bundle is malformed (not a zip of plain ``.npy`` members)."""


class BundleTooLarge(BundleError):
    """The bundle, or what it would expand to, is larger than the limit; ``limit`` and ``size`` in bytes."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


def limit_for(arrays: int, payload_bytes: int) -> int:
    """The byte limit of a bundle of ``arrays`` members holding at most ``payload_bytes`` of array data."""
    return payload_bytes + arrays * MEMBER_OVERHEAD + ARCHIVE_OVERHEAD


def read_npz(data: bytes | bytearray | memoryview, *, limit: int, what: str = "bundle"
             ) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` held in ``data``, refusing (before expanding anything) a bundle whose size on
    the wire or in memory would exceed ``limit`` bytes, compressed members, object arrays and headers that do
    not match their member's size."""
    size = len(data)
    if size > limit:
        raise BundleTooLarge(f"{what} has {size:,} bytes, more than the limit of {limit:,}", size=size,
                             limit=limit)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            expanded = 0
            for info in infos:  # what the members say they expand to, before anything is expanded
                expanded += _declared_size(zf, info, what)
                if expanded > limit:
                    raise BundleTooLarge(f"{what} would expand to at least {expanded:,} bytes, more than the "
                                         f"limit of {limit:,}", size=expanded, limit=limit)
            for info in infos:
                _check_stored(zf, info, what)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise BundleError(f"{what} is not a valid array bundle: {e}") from e
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, KeyError, EOFError) as e:
        raise BundleError(f"{what} is not a valid array bundle: {e}") from e


def _declared_size(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> int:
    """The larger of the zip's and the ``.npy`` header's size for member ``info`` (the header is what numpy
    allocates from). Reading the header decompresses at most its own few bytes."""
    header_len, nbytes = _npy_header(zf, info, what)
    return max(header_len + nbytes, info.file_size)


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> tuple[int, int]:
    """(header length, data bytes) of member ``info``'s ``.npy`` header."""
    if not info.filename.endswith(".npy"):
        raise BundleError(f"{what}: member {info.filename!r} is not a .npy array")
    with zf.open(info) as f:
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as e:
            raise BundleError(f"{what}: member {info.filename!r} has no valid .npy header: {e}") from e
        header_len = f.tell()
    if dtype.hasobject:
        raise BundleError(f"{what}: member {info.filename!r} holds Python objects")
    return header_len, math.prod(shape) * dtype.itemsize


def _check_stored(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> None:
    """Within the limit, still only what fldsl writes: stored members whose header matches their size."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise BundleError(f"{what}: member {info.filename!r} is compressed; fldsl bundles are stored "
                          "uncompressed, and a compressed member could expand far beyond its size on the "
                          "wire")
    header_len, nbytes = _npy_header(zf, info, what)
    if info.file_size != info.compress_size or header_len + nbytes != info.file_size:
        raise BundleError(f"{what}: member {info.filename!r} declares {nbytes:,} bytes of data but holds "
                          f"{info.compress_size - header_len:,}")
