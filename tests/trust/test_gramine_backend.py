"""The Gramine backend against a fake /dev/attestation directory."""

from __future__ import annotations

import os

import pytest

from fldsl.runtime.attestation.backend import AttestationError
from fldsl.runtime.attestation.gramine import GramineBackend, available


def fake_root(tmp_path, backend_a, att_type: bytes = b"dcap", report_data: bytes = b"\x11" * 64):
    root = tmp_path / "attestation"
    (root / "keys").mkdir(parents=True)
    (root / "attestation_type").write_bytes(att_type)  # Gramine writes no trailing newline
    (root / "user_report_data").write_bytes(b"")
    # A real /dev/attestation/quote is generated at open() from user_report_data; the fake holds one made
    # for the report data the test expects the backend to write.
    (root / "quote").write_bytes(backend_a.quote(report_data))
    (root / "keys" / "_sgx_mrenclave").write_bytes(b"\x07" * 16)
    return root


def test_quote_writes_report_data_in_one_64_byte_write(tmp_path, backend_a, monkeypatch):
    root = fake_root(tmp_path, backend_a)
    writes: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    quote = GramineBackend(root).quote(b"\x11" * 64)
    assert writes == [64]
    assert (root / "user_report_data").read_bytes() == b"\x11" * 64
    assert quote == (root / "quote").read_bytes()
    assert available(root)


def test_quote_not_carrying_our_report_data_is_an_error(tmp_path, backend_a):
    root = fake_root(tmp_path, backend_a, report_data=b"\x22" * 64)
    with pytest.raises(AttestationError, match="does not carry the report data"):
        GramineBackend(root).quote(b"\x11" * 64)


def test_attestation_type_must_be_dcap(tmp_path, backend_a):
    root = fake_root(tmp_path, backend_a, att_type=b"none")
    assert not available(root)
    with pytest.raises(AttestationError, match="expected 'dcap'"):
        GramineBackend(root)


def test_outside_gramine_is_a_clear_error(tmp_path):
    with pytest.raises(AttestationError, match="not running inside gramine-sgx"):
        GramineBackend(tmp_path / "missing")


def test_sealing_key_is_derived_not_raw(tmp_path, backend_a):
    root = fake_root(tmp_path, backend_a)
    key = GramineBackend(root).sealing_key()
    assert len(key) == 32 and b"\x07" * 16 not in key
    assert key == GramineBackend(root).sealing_key()
    (root / "keys" / "_sgx_mrenclave").write_bytes(b"\x07" * 15)
    with pytest.raises(AttestationError, match="expected 16"):
        GramineBackend(root).sealing_key()


def test_report_data_must_be_64_bytes(tmp_path, backend_a):
    with pytest.raises(AttestationError, match="64 bytes"):
        GramineBackend(fake_root(tmp_path, backend_a)).quote(b"short")


def test_own_quote_verification_fails_closed_without_qvl(tmp_path, backend_a):
    from fldsl.runtime.attestation import qvl

    if qvl.find_library() is not None:
        pytest.skip("Intel QVL installed")
    verdict = GramineBackend(fake_root(tmp_path, backend_a)).verify(
        (tmp_path / "attestation" / "quote").read_bytes()
    )
    assert not verdict.ok
