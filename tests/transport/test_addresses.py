"""addresses.json: round trip, validation with the file named, targets (IPv6 bracketed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fldsl.artifacts import ArtifactError
from fldsl.runtime.transport import Addresses, NodeAddress, load_addresses, save_addresses


def test_round_trip_is_canonical(tmp_path: Path) -> None:
    a = Addresses({"shop.trainer": NodeAddress(host="127.0.0.1", port=5001, bootstrap_port=5002),
                   "media.trainer": NodeAddress(host="::1", port=6001, bootstrap_port=6002)})
    path = tmp_path / "addresses.json"
    save_addresses(a, path)
    text = path.read_text()
    assert text.index("media.trainer") < text.index("shop.trainer") and text.endswith("}\n")
    b = load_addresses(path)
    assert b == a
    assert b["shop.trainer"].secure_target() == "127.0.0.1:5001"
    assert b["media.trainer"].bootstrap_target() == "[::1]:6002"
    with pytest.raises(KeyError, match=r"no entry for bank\.node \(known: media\.trainer, shop\.trainer\)"):
        b["bank.node"]


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="missing"):
        load_addresses(tmp_path / "nope.json")
    bad = tmp_path / "addresses.json"
    bad.write_text('{"a.b": {"host": "h", "port": 7, "bootstrap_port": 7}}')
    with pytest.raises(ArtifactError, match="port and bootstrap_port must differ"):
        load_addresses(bad)
    bad.write_text('{"a.b": {"host": "h", "port": 70000, "bootstrap_port": 7}}')
    with pytest.raises(ArtifactError, match=r"addresses\.json: not a valid addresses file"):
        load_addresses(bad)


def test_key_service_is_optional_validated_and_kept_out_of_files_without_one(tmp_path: Path) -> None:
    path = tmp_path / "addresses.json"
    plain = Addresses({"shop.trainer": NodeAddress(host="127.0.0.1", port=5001, bootstrap_port=5002)})
    save_addresses(plain, path)
    assert "key_service" not in path.read_text()
    with_service = Addresses({"shop.trainer": NodeAddress(host="127.0.0.1", port=5001, bootstrap_port=5002,
                                                          key_service="owner.example:7443"),
                              "media.trainer": NodeAddress(host="::1", port=6001, bootstrap_port=6002,
                                                           key_service="[::1]:7444")})
    save_addresses(with_service, path)
    back = load_addresses(path)
    assert back["shop.trainer"].key_service == "owner.example:7443"
    assert back["media.trainer"].key_service == "[::1]:7444"
    for bad in ("owner.example", "owner.example:0", "owner.example:70000", ":7443", "::1:7443", "h:port"):
        entry = {"host": "h", "port": 1, "bootstrap_port": 2, "key_service": bad}
        path.write_text(json.dumps({"a.b": entry}))
        with pytest.raises(ArtifactError, match="not a valid addresses file"):
            load_addresses(path)
