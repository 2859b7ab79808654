"""Exported models encrypted to their owner's key: the file format, a real exported model opened with
`fldsl model decrypt --owner-key`, `fldsl trust owner-key`, and `fldsl compile --owner-key`."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fldsl.artifacts import Plan, dump_json, load_model, node_dir
from fldsl.cli import EXIT_INPUT, EXIT_OK, EXIT_TRUST, main
from fldsl.runtime import owner_export as ox

sys.path.insert(0, str(Path(__file__).parent))
import buildkit
import memlink

REPO = Path(__file__).resolve().parents[2]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("owner")
    res = run("trust", "owner-key", str(d / "owner.pem"))
    assert res.exit_code == EXIT_OK, res.output
    return d / "owner.pem", d / "owner.pub.pem"


# ---------------------------------------------------------------------------------------------------------
# the format
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["x25519", "p256", "p384", "rsa3072"])
@pytest.mark.parametrize("size", [0, 999, 3000])
def test_round_trip_every_key_type_and_chunking(tmp_path: Path, kind: str, size: int) -> None:
    priv, pub = _keys(kind)
    data = os.urandom(size)
    src, out = tmp_path / "m.owner", tmp_path / "m.npz"
    ox.encrypt_file(data, src, recipient_pem=pub.decode(), node_id="a.n", name="a.n/model", chunk_size=1000)
    header = ox.decrypt_file(src, out, private_pem=priv, node_id="a.n", name="a.n/model")
    assert out.read_bytes() == data and header.length == size and header.node == "a.n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


_KEYS: dict[str, tuple[bytes, bytes]] = {}


def _keys(kind: str) -> tuple[bytes, bytes]:
    if kind not in _KEYS:  # RSA-3072 generation takes a moment: once per kind
        _KEYS[kind] = ox.generate_owner_key(kind)  # type: ignore[arg-type]
    return _KEYS[kind]


def _sample(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    priv, pub = _keys("x25519")
    src = tmp_path / "m.owner"
    ox.encrypt_file(b"model bytes " * 300, src, recipient_pem=pub.decode(), node_id="a.n", name="a.n/model",
                    chunk_size=1024)
    return src, priv, src.read_bytes()


@pytest.mark.parametrize("edit", ["flip-body", "truncate", "drop-last-chunk", "append", "relabel-header"])
def test_any_change_is_refused_and_nothing_is_written(tmp_path: Path, edit: str) -> None:
    src, priv, blob = _sample(tmp_path)
    if edit == "flip-body":
        blob = blob[:-40] + bytes([blob[-40] ^ 1]) + blob[-39:]
    elif edit == "truncate":
        blob = blob[:-5]
    elif edit == "drop-last-chunk":  # 3600 bytes = 1024 * 3 + 528: drop the last (528 + 16 tag)
        blob = blob[:-544]
    elif edit == "append":
        blob = blob + b"\0"
    else:  # same length, another node name: the header is authenticated by every chunk
        blob = blob.replace(b'"node":"a.n"', b'"node":"b.n"', 1)
    src.write_bytes(blob)
    out = tmp_path / "out"
    with pytest.raises(ox.OwnerExportError) as e:
        ox.decrypt_file(src, out, private_pem=priv)
    assert e.value.reason == "tampered", e.value
    assert not out.exists() and not out.with_name("out.tmp").exists()


def test_wrong_key_and_wrong_label_are_named(tmp_path: Path) -> None:
    src, priv, _ = _sample(tmp_path)
    other, _ = _keys("p256")
    with pytest.raises(ox.OwnerExportError, match="wrong owner key") as e:
        ox.decrypt_file(src, tmp_path / "o", private_pem=other)
    assert e.value.reason == "wrong-key"
    with pytest.raises(ox.OwnerExportError, match=r"not 'b\.n'"):
        ox.decrypt_file(src, tmp_path / "o", private_pem=priv, node_id="b.n")


def test_unsupported_recipient_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p521 = ec.generate_private_key(ec.SECP521R1())
    for key, msg in ((weak, "too small"), (p521, "not supported")):
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(ox.OwnerKeyError, match=msg):
            ox.public_key_pem(pem)
    with pytest.raises(ox.OwnerKeyError, match="PRIVATE key"):
        ox.public_key_pem(_keys("x25519")[0])
    with pytest.raises(ox.OwnerKeyError, match="not a PEM public key"):
        ox.public_key_pem("hello")


def test_owner_key_command_refuses_to_overwrite_or_follow_symlinks(tmp_path: Path) -> None:
    res = run("trust", "owner-key", str(tmp_path / "k.pem"), "--type", "p256")
    assert res.exit_code == EXIT_OK, res.output
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    ox.public_key_pem((tmp_path / "k.pub.pem").read_bytes())
    again = run("trust", "owner-key", str(tmp_path / "k.pem"))
    assert again.exit_code == EXIT_INPUT and "already exists" in again.output
    (tmp_path / "link.pem").symlink_to(tmp_path / "elsewhere.pem")
    res = run("trust", "owner-key", str(tmp_path / "link.pem"))
    assert res.exit_code == EXIT_INPUT and not (tmp_path / "elsewhere.pem").exists()


# ---------------------------------------------------------------------------------------------------------
# a real exported model
# ---------------------------------------------------------------------------------------------------------


def _weights(npz_bytes: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(npz_bytes)) as npz:
        return [npz[k] for k in sorted(npz.files)]


def test_exported_model_opens_with_the_owner_key_only(tmp_path: Path, owner: tuple[Path, Path]) -> None:
    from fldsl.runtime import sealing

    priv, pub = owner
    build = buildkit.vertical_build(tmp_path, rows=200, epochs=1, method="join")
    plan_path = node_dir(build, "media.trainer") / "plan.json"
    plan = load_model(Plan, plan_path)
    plan.export_recipient = ox.public_key_pem(pub.read_bytes())
    plan_path.write_text(dump_json(plan))
    res = memlink.run_in_threads(build, tmp_path / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    models = tmp_path / "run" / "models"
    owner_file = models / "media.trainer_model.owner"
    assert owner_file.is_file() and not (models / "shop.trainer_model.owner").exists()

    out = tmp_path / "model.npz"
    ok = run("model", "decrypt", str(owner_file), "--owner-key", str(priv), "-o", str(out),
             "--node", "media.trainer", "--name", "media.trainer/model")
    assert ok.exit_code == EXIT_OK, ok.output
    assert "exported by media.trainer" in ok.output
    sealed = sealing.unseal_file(models / "media.trainer_model.sealed", key=memlink.KEY,
                                 node_id="media.trainer", name="media.trainer/model")
    got, want = _weights(out.read_bytes()), _weights(bytes(sealed))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)

    wrong = tmp_path / "wrong.pem"
    assert run("trust", "owner-key", str(wrong)).exit_code == EXIT_OK
    bad = run("model", "decrypt", str(owner_file), "--owner-key", str(wrong), "-o", str(tmp_path / "x"))
    assert bad.exit_code == EXIT_TRUST and "wrong owner key" in bad.output and not (tmp_path / "x").exists()
    no_key = run("model", "decrypt", str(owner_file), "-o", str(tmp_path / "x"))
    assert no_key.exit_code == EXIT_INPUT and "--owner-key" in no_key.output
    sealed_with_owner_key = run("model", "decrypt", str(models / "media.trainer_model.sealed"),
                                "--owner-key", str(priv), "-o", str(tmp_path / "x"))
    assert sealed_with_owner_key.exit_code == EXIT_INPUT and "is sealed" in sealed_with_owner_key.output


# ---------------------------------------------------------------------------------------------------------
# fldsl compile --owner-key
# ---------------------------------------------------------------------------------------------------------


def test_compile_puts_the_owner_key_into_the_exporting_plans(tmp_path: Path, owner: tuple[Path, Path]
                                                             ) -> None:
    _, pub = owner
    flp = str(REPO / "pipelines" / "vertical_wide_deep.flp")
    plain = run("compile", flp, "-o", str(tmp_path / "plain"))
    assert plain.exit_code == EXIT_OK, plain.output
    res = run("compile", flp, "-o", str(tmp_path / "b"), "--owner-key", f"shop={pub}")
    assert res.exit_code == EXIT_OK, res.output
    shop = json.loads((tmp_path / "b/nodes/shop.trainer/plan.json").read_text())
    assert shop["export_recipient"] == ox.public_key_pem(pub.read_bytes())
    # The key is measured with shop's plan; media's plan keeps its bytes, and so do plans without a key.
    pins = {d: json.loads((tmp_path / d / "nodes/media.trainer/pins.json").read_text())
            for d in ("plain", "b")}
    assert pins["plain"]["nodes"]["shop.trainer"] != pins["b"]["nodes"]["shop.trainer"]
    assert pins["plain"]["nodes"]["media.trainer"] == pins["b"]["nodes"]["media.trainer"]
    media = [(tmp_path / d / "nodes/media.trainer/plan.json").read_bytes() for d in ("plain", "b")]
    assert media[0] == media[1]
    assert "export_recipient" not in (tmp_path / "plain/nodes/shop.trainer/plan.json").read_text()


def test_compile_refuses_bad_owner_keys(tmp_path: Path, owner: tuple[Path, Path]) -> None:
    priv, pub = owner
    flp = str(REPO / "pipelines" / "vertical_wide_deep.flp")
    unknown = run("compile", flp, "-o", str(tmp_path / "b"), "--owner-key", f"shoop={pub}")
    assert unknown.exit_code == EXIT_INPUT and "no party `shoop`" in unknown.output
    assert "did you mean `shop`" in unknown.output
    private = run("compile", flp, "-o", str(tmp_path / "b"), "--owner-key", f"shop={priv}")
    assert private.exit_code == EXIT_INPUT and "PRIVATE key" in private.output
    missing = run("compile", flp, "-o", str(tmp_path / "b"), "--owner-key", f"shop={tmp_path / 'nope.pem'}")
    assert missing.exit_code == EXIT_INPUT and "cannot read" in missing.output
    malformed = run("compile", flp, "-o", str(tmp_path / "b"), "--owner-key", "shop")
    assert malformed.exit_code == EXIT_INPUT and "PARTY=PUBKEY.pem" in malformed.output
    assert not (tmp_path / "b").exists()


def test_compile_refuses_an_owner_key_for_a_party_that_exports_nothing(tmp_path: Path,
                                                                       owner: tuple[Path, Path]) -> None:
    # Horizontal: the aggregator exports the model, the workers export nothing.
    flp = str(REPO / "pipelines" / "horizontal_dlrm.flp")
    res = run("compile", flp, "-o", str(tmp_path / "b"), "--owner-key", f"bank1={owner[1]}")
    assert res.exit_code == EXIT_INPUT and "party `bank1` exports no model" in res.output
    assert "hub" in res.output
