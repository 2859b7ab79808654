"""addresses.json: round trip, validation with the file named, targets (IPv6 bracketed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fldsl.runtime.transport import Addresses, NodeAddress, load_addresses, save_addresses

from fldsl.artifacts import ArtifactError


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
