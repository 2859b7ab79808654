"""Per-party trust folders: `fldsl trust init --party`, `add-peer`, `show`; a local run's folders hold each
party's own secrets only; a node quotes only from its own party's folder and needs its peers pinned."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fldsl.cli import EXIT_OK, EXIT_TRUST, main
from fldsl.runtime.attestation.backend import AttestationError
from fldsl.runtime.attestation.parties import (
    add_peer,
    init_party,
    load_identity,
    local_deployment,
    secret_files,
    sim_roots,
)


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_two_organisations_exchange_identities_with_the_cli(tmp_path: Path) -> None:
    bank, shop = tmp_path / "bank-host", tmp_path / "shop-host"  # two machines: two trust roots
    res = run("trust", "init", "--party", "bank", "--trust-dir", str(bank))
    assert res.exit_code == EXIT_OK, res.output
    assert "created  identity.json  (public: send it to the other parties)" in res.output
    fingerprint = next(ln.split(" ", 1)[1] for ln in res.output.splitlines() if ln.startswith("fingerprint:"))
    assert fingerprint == load_identity(bank / "bank" / "identity.json").fingerprint()
    assert run("trust", "init", "--party", "shop", "--trust-dir", str(shop)).exit_code == EXIT_OK
    # Only the public file crosses: each pins the other's.
    res = run("trust", "add-peer", str(bank / "bank" / "identity.json"), "--party", "shop",
              "--trust-dir", str(shop))
    assert res.exit_code == EXIT_OK and "added: party bank pinned" in res.output and fingerprint in res.output
    res = run("trust", "add-peer", str(shop / "shop" / "identity.json"), "--party", "bank",
              "--trust-dir", str(bank))
    assert res.exit_code == EXIT_OK, res.output
    again = run("trust", "add-peer", str(bank / "bank" / "identity.json"), "--party", "shop", "--trust-dir",
                str(shop))
    assert again.exit_code == EXIT_OK and "unchanged" in again.output
    show = run("trust", "show", "--party", "shop", "--trust-dir", str(shop))
    assert show.exit_code == EXIT_OK and "bank" in show.output and fingerprint in show.output
    assert set(sim_roots(shop / "shop")) == {"bank", "shop"}
    # Neither host has any file of the other's secrets.
    bank_secrets = {p.read_bytes() for p in secret_files(bank / "bank")}
    shop_files = {p.read_bytes() for p in (shop).rglob("*") if p.is_file()}
    assert bank_secrets and not bank_secrets & shop_files


def test_a_changed_identity_is_refused_until_confirmed(tmp_path: Path) -> None:
    """Like an SSH host key that changed: a re-keyed peer, or someone standing in for it."""
    local_deployment(tmp_path / "a", ["bank", "shop"])
    impostor = tmp_path / "b"
    init_party(impostor, "bank")
    res = run("trust", "add-peer", str(impostor / "bank" / "identity.json"), "--party", "shop", "--trust-dir",
              str(tmp_path / "a"))
    assert res.exit_code == EXIT_TRUST
    assert "already pinned with another identity" in res.output and "--replace" in res.output
    assert "Traceback" not in res.output
    res = run("trust", "add-peer", str(impostor / "bank" / "identity.json"), "--party", "shop", "--trust-dir",
              str(tmp_path / "a"), "--replace")
    assert res.exit_code == EXIT_OK and "replaced" in res.output
    pinned = sim_roots(tmp_path / "a" / "shop")["bank"]
    assert pinned == load_identity(impostor / "bank" / "identity.json").root_pem


def test_identity_files_are_checked(tmp_path: Path) -> None:
    local_deployment(tmp_path, ["bank", "shop"])
    bad = tmp_path / "bad.json"
    doc = json.loads((tmp_path / "bank" / "identity.json").read_text())
    for edit, message in ((dict(doc, party="../etc"), "not an identifier"),
                          (dict(doc, sim_root_ca="-----BEGIN CERTIFICATE-----\nAAAA\n"),
                           "not a PEM certificate"),
                          (dict(doc, extra=1), "extra"),
                          ("x" * 70_000, "larger than 64 KiB")):
        bad.write_text(edit if isinstance(edit, str) else json.dumps(edit))
        res = run("trust", "add-peer", str(bad), "--party", "shop", "--trust-dir", str(tmp_path))
        assert res.exit_code == EXIT_TRUST and message in res.output, (message, res.output)
    with pytest.raises(AttestationError, match="own folder"):
        add_peer(tmp_path / "bank", load_identity(tmp_path / "bank" / "identity.json"))
    (tmp_path / "bank").rename(tmp_path / "shop3")  # bank's folder, moved where party shop3's would be
    with pytest.raises(AttestationError, match="holds the trust material of party `bank`, not `shop3`"):
        init_party(tmp_path, "shop3")


def test_a_local_run_gives_each_party_its_own_secrets_only(tmp_path: Path) -> None:
    created = local_deployment(tmp_path, ["media", "shop", "media"])
    assert "media/sealing.key" in created and "shop/peers/media.json" in created
    media = {p.name: p.read_bytes() for p in secret_files(tmp_path / "media")}
    shop = {p.name: p.read_bytes() for p in secret_files(tmp_path / "shop")}
    assert media.keys() == shop.keys() == {"attestation.key", "enclave_signing.key", "pck.key", "root_ca.key",
                                          "sealing.key"}
    assert all(media[k] != shop[k] for k in media)
    assert local_deployment(tmp_path, ["media", "shop"]) == []  # idempotent: nothing new the second time


def _node_args(folder: Path, node: str) -> argparse.Namespace:
    return argparse.Namespace(attestation="sim", runner="python", trust_dir=folder, node=node)


def test_a_node_quotes_only_from_its_own_partys_folder(tmp_path: Path) -> None:
    from fldsl.artifacts import Identity
    from fldsl.runtime.node import NodeError, _backend

    local_deployment(tmp_path, ["media", "shop"])
    me = Identity(mr_enclave=["00" * 32], isv_prod_id=0, isv_svn_min=0)
    with pytest.raises(NodeError, match=r"is party `media`'s trust folder; node shop\.trainer belongs to"):
        _backend(_node_args(tmp_path / "media", "shop.trainer"), b"m", me, ["media.trainer"])
    with pytest.raises(NodeError, match="not a party's trust folder"):
        _backend(_node_args(tmp_path, "shop.trainer"), b"m", me, ["media.trainer"])
    (tmp_path / "shop" / "peers" / "media.json").unlink()
    with pytest.raises(NodeError, match="no identity pinned for party media"):
        _backend(_node_args(tmp_path / "shop", "shop.trainer"), b"m", me, ["media.trainer"])
    backend, roots = _backend(_node_args(tmp_path / "media", "media.trainer"), b"m", me, ["shop.trainer"])
    assert backend.kind == "sim" and set(roots) == {"media", "shop"}
