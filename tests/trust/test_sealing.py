"""Sealed storage: round trips and every attack the envelope must detect."""

from __future__ import annotations

import os

import pytest

from fldsl.runtime import sealing
from fldsl.runtime.sealing import SealError, VersionStore

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
CHUNK = 1024  # small chunks keep the multi-chunk cases fast


def seal(data: bytes, *, name: str = "model", version: int = 1, node: str = "a.n", key: bytes = KEY) -> bytes:
    return bytes(
        sealing.seal_bytes(data, key=key, node_id=node, name=name, version=version, chunk_size=CHUNK)
    )


def reason(blob: bytes, **kw) -> str:
    args = {"key": KEY, "node_id": "a.n", "name": "model"} | kw
    with pytest.raises(SealError) as info:
        sealing.unseal_bytes(blob, **args)
    return info.value.reason


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7, 40 * CHUNK + 3])
def test_roundtrip_sizes(size):
    data = os.urandom(size)
    blob = seal(data)
    assert sealing.unseal_bytes(blob, key=KEY, node_id="a.n", name="model") == data
    assert size < 16 or data not in blob  # short inputs can appear in ciphertext by chance


def test_file_roundtrip_streams_and_header_is_inspectable(tmp_path):
    data = os.urandom(3 * CHUNK + 5)
    (tmp_path / "plain").write_bytes(data)
    sealing.seal_file(
        tmp_path / "plain",
        tmp_path / "m.sealed",
        key=KEY,
        node_id="a.n",
        name="model",
        version=4,
        chunk_size=CHUNK,
    )
    h = sealing.read_header_file(tmp_path / "m.sealed")
    assert (h.node_id, h.name, h.version, h.total_length, h.chunks) == ("a.n", "model", 4, len(data), 4)
    assert (tmp_path / "m.sealed").stat().st_size == h.sealed_size
    sealing.unseal_file(tmp_path / "m.sealed", tmp_path / "out", key=KEY, node_id="a.n", name="model")
    assert (tmp_path / "out").read_bytes() == data
    assert sealing.unseal_file(tmp_path / "m.sealed", key=KEY, node_id="a.n", name="model") == data


def test_every_single_bit_flip_is_detected():
    blob = seal(os.urandom(2 * CHUNK + 3))
    for pos in range(0, len(blob), 7):  # header, every chunk body and every tag
        mutated = bytearray(blob)
        mutated[pos] ^= 0x01
        assert reason(bytes(mutated)) in {
            "tampered",
            "truncated",
            "corrupt",
            "wrong-key",
            "wrong-node",
            "wrong-name",
            "not-sealed",
            "format",
        }, pos


def test_flip_in_ciphertext_is_reported_as_tampering():
    blob = bytearray(seal(os.urandom(3 * CHUNK)))
    blob[-CHUNK] ^= 0x80
    assert reason(bytes(blob)) == "tampered"


def test_large_buffers_open_in_parallel_and_name_the_first_bad_chunk():
    # 40 chunks take the multi-threaded in-memory path; the file path reads the same blob sequentially.
    data = os.urandom(40 * CHUNK)
    blob = bytearray(seal(data))
    header = len(blob) - 40 * (CHUNK + sealing.TAG)
    for chunk in (33, 6):  # a late and an early chunk, in different threads' ranges
        blob[header + chunk * (CHUNK + sealing.TAG) + 5] ^= 0x01
    with pytest.raises(SealError, match="chunk 7 of 40") as info:
        sealing.unseal_bytes(bytes(blob), key=KEY, node_id="a.n", name="model")
    assert info.value.reason == "tampered"


def test_truncation_and_missing_last_chunk_are_detected():
    blob = seal(os.urandom(3 * CHUNK))
    last = CHUNK + sealing.TAG
    assert reason(blob[:-last]) == "truncated"  # last chunk dropped entirely
    assert reason(blob[:-1]) == "truncated"
    assert reason(blob[:10]) == "truncated"
    assert reason(blob + b"\0") == "tampered"


def test_length_field_cannot_be_shortened_to_hide_a_dropped_chunk():
    blob = bytearray(seal(os.urandom(3 * CHUNK)))
    # total_length lives at offset 8+2+16+4 = 30 (u64): claim two chunks and drop the third.
    blob[30:38] = (2 * CHUNK).to_bytes(8, "big")
    assert reason(bytes(blob[: -(CHUNK + sealing.TAG)])) == "tampered"


def test_wrong_key_is_named():
    assert reason(seal(b"secret weights"), key=OTHER_KEY) == "wrong-key"


def test_file_swapped_between_names_or_nodes_is_detected():
    model, ckpt = seal(b"model bytes", name="model"), seal(b"checkpoint bytes", name="ckpt/3")
    assert reason(ckpt, name="model") == "wrong-name"
    assert reason(model, node_id="b.n") == "wrong-node"


def test_header_label_rewritten_to_match_still_fails_authentication():
    """Editing the plaintext name in the header to the expected one does not help: it is in the AAD."""
    blob = seal(b"checkpoint bytes", name="ckpt/1")
    forged = blob.replace(b"ckpt/1", b"ckpt/2", 1)
    assert reason(forged, name="ckpt/2") == "tampered"


def test_rollback_to_an_older_version_is_detected(tmp_path):
    store = VersionStore(tmp_path / "versions.json", key=KEY, node_id="a.n")
    old = seal(b"v1", version=store.next("model"))
    store.advance("model", 1)
    new = seal(b"v2", version=store.next("model"))
    store.advance("model", 2)
    assert (
        sealing.unseal_bytes(new, key=KEY, node_id="a.n", name="model", min_version=store.get("model"))
        == b"v2"
    )
    assert reason(old, min_version=store.get("model")) == "rollback"
    assert reason(new, version=3) == "wrong-version"
    with pytest.raises(SealError, match="older than recorded"):
        store.advance("model", 1)


def test_version_store_tampering_is_detected(tmp_path):
    path = tmp_path / "versions.json"
    VersionStore(path, key=KEY, node_id="a.n").advance("model", 5)
    path.write_text(path.read_text().replace('"model": 5', '"model": 1'))
    with pytest.raises(SealError) as info:
        VersionStore(path, key=KEY, node_id="a.n").get("model")
    assert info.value.reason == "counter-tampered"
    with pytest.raises(SealError):
        VersionStore(path, key=OTHER_KEY, node_id="a.n").get("model")


def test_failed_unseal_leaves_no_output_file(tmp_path):
    (tmp_path / "m.sealed").write_bytes(seal(os.urandom(3 * CHUNK))[:-5])
    with pytest.raises(SealError):
        sealing.unseal_file(tmp_path / "m.sealed", tmp_path / "out", key=KEY, node_id="a.n", name="model")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_not_a_sealed_file():
    assert reason(b"PK\x03\x04 a zip file, not sealed" * 3) == "not-sealed"


def test_nonces_differ_between_seals():
    a, b = seal(b"same"), seal(b"same")
    assert a != b
