"""Frame encoding: chunk boundaries, zero-copy aligned decoding, wire compatibility, malformed input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fldsl.runtime.transport import FrameError, codec
from fldsl.runtime.transport import fldsl_pb2 as pb


@pytest.mark.parametrize(("nbytes", "chunk", "frames"), [(0, 16, 1), (16, 16, 1), (17, 16, 2), (32, 16, 2),
                                                         (4 << 20, 4 << 20, 1), ((4 << 20) + 4, 4 << 20, 2)])
def test_chunk_counts_at_boundaries(nbytes: int, chunk: int, frames: int) -> None:
    arr = np.random.default_rng(nbytes).integers(0, 255, nbytes, dtype=np.uint8)
    out = list(codec.tensor_frames("f", 0, arr, chunk))
    assert len(out) == frames
    headers = [codec.decode_frame(f)[0].tensor for f in out]
    assert [h.chunk for h in headers] == list(range(frames)) and {h.chunks for h in headers} == {frames}
    assert b"".join(bytes(codec.decode_frame(f)[1]) for f in out) == arr.tobytes()


def test_single_frame_decodes_in_place_aligned_and_is_a_valid_protobuf() -> None:
    arr = np.random.default_rng(0).random((33, 7)).astype(np.float64)
    (frame,) = codec.tensor_frames("layer/act", 5, arr, 1 << 20)
    header, payload = codec.decode_frame(frame)
    out = codec.array_from_buffer(header.tensor.dtype, header.tensor.shape, payload)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.aligned and not out.flags.writeable  # a view on the received bytes, not a copy
    full = pb.Frame.FromString(frame)  # any protobuf reader sees the same message
    assert full.tensor.flow == "layer/act" and full.payload == arr.tobytes()


def test_payload_not_last_still_decodes_through_protobuf() -> None:
    msg = pb.Frame(blob=pb.BlobHeader(flow="x", chunks=1, total_bytes=3), payload=b"abc")
    data = msg.SerializeToString()
    # protobuf writes fields in number order, so reorder by hand: payload first, then the header.
    head = pb.Frame(blob=msg.blob).SerializeToString()
    reordered = data[len(head):] + head
    header, payload = codec.decode_frame(reordered)
    assert header.blob.flow == "x" and bytes(payload) == b"abc"


def test_big_endian_and_non_contiguous_inputs_travel_little_endian() -> None:
    be = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    (frame,) = codec.tensor_frames("f", 0, be, 1 << 20)
    h, p = codec.decode_frame(frame)
    out = codec.array_from_buffer(h.tensor.dtype, h.tensor.shape, p)
    np.testing.assert_array_equal(out, be)
    assert out.dtype == np.dtype("<i4")


def test_array_from_buffer_checks_sizes() -> None:
    with pytest.raises(FrameError, match="needs 16 bytes"):
        codec.array_from_buffer("float32", [2, 2], b"\0" * 15)
    with pytest.raises(FrameError, match="unknown dtype"):
        codec.array_from_buffer("complex64", [1], b"\0" * 8)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_never_crashes_on_garbage(data: bytes) -> None:
    try:
        codec.decode_frame(data)
    except FrameError:
        pass
