"""`fldsl trust init`, `fldsl inspect cert|quote|sealed`, `fldsl model decrypt`: output and exit codes."""

from __future__ import annotations

import json
import stat

import pytest
from click.testing import CliRunner

from fldsl.cli import EXIT_INPUT, EXIT_OK, EXIT_TRUST, main
from fldsl.runtime import sealing
from fldsl.runtime.attestation import qvl, ratls

from .conftest import MR_A, VECTORS


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_trust_init_creates_then_reuses_and_says_simulated(tmp_path):
    d = tmp_path / "t" / "media"
    first = run("trust", "init", "--party", "media", "--trust-dir", str(d.parent))
    assert first.exit_code == EXIT_OK, first.output
    assert "SIMULATED" in first.output and "created  sealing.key" in first.output
    assert stat.S_IMODE((d / "sealing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "attestation.key").stat().st_mode) == 0o600
    key_before = (d / "enclave_signing.key").read_bytes()
    second = run("trust", "init", "--party", "media", "--trust-dir", str(d.parent))
    assert "reused   enclave_signing.key" in second.output and "created" not in second.output
    assert (d / "enclave_signing.key").read_bytes() == key_before


@pytest.fixture
def own_cert(tmp_path, deployment):
    backend = deployment.backend(mr_enclave=MR_A, isv_prod_id=7, isv_svn=2, debug=False)
    path = tmp_path / "node.pem"
    path.write_bytes(ratls.make_identity(backend, node_id="media.n", pins_digest="00" * 32).cert_pem)
    return path


def test_inspect_own_cert_verifies_against_the_trust_dir(own_cert, deployment):
    res = run("inspect", "cert", str(own_cert), "--json", "--trust-dir", str(deployment.dir))
    assert res.exit_code == EXIT_OK, res.output
    doc = json.loads(res.output)
    assert doc["node_id"] == "media.n" and doc["pubkey_hash_ok"] and doc["genuine"]["ok"]
    assert doc["quote"]["mr_enclave"] == MR_A.hex() and doc["quote"]["simulated"] is True


def test_inspect_own_cert_against_another_deployment_is_a_trust_failure(own_cert, other_deployment):
    res = run("inspect", "cert", str(own_cert), "--trust-dir", str(other_deployment.dir))
    assert res.exit_code == EXIT_TRUST and "quote not verified" in res.output


@pytest.mark.skipif(qvl.find_library() is not None, reason="Intel QVL installed")
def test_inspect_real_gramine_cert_shows_values_and_refuses(tmp_path):
    res = run("inspect", "cert", str(VECTORS / "gramine-ra-tls-cert.pem"), "--trust-dir", str(tmp_path))
    assert res.exit_code == EXIT_TRUST
    assert "0866e7ca11b9f4efe4bf39b2607f4e1299f111920d96d95719080f01b62b7585" in res.output
    assert "DEBUG enclave" in res.output and "libsgx_dcap_quoteverify" in res.output


def test_inspect_garbage_cert_is_bad_input(tmp_path):
    (tmp_path / "x.pem").write_text("hello")
    res = run("inspect", "cert", str(tmp_path / "x.pem"))
    assert res.exit_code == EXIT_INPUT and "not a valid X.509 certificate" in res.output


def test_inspect_quote_binary_and_hex(tmp_path, backend_a, deployment):
    raw = backend_a.quote(b"\x05" * 64)
    (tmp_path / "q.bin").write_bytes(raw)
    (tmp_path / "q.hex").write_text(raw.hex() + "\n")
    for name in ("q.bin", "q.hex"):
        res = run("inspect", "quote", str(tmp_path / name), "--trust-dir", str(deployment.dir))
        assert res.exit_code == EXIT_OK, res.output
        assert MR_A.hex() in res.output and "SIMULATED" in res.output
    (tmp_path / "bad.bin").write_bytes(raw[:600])
    assert run("inspect", "quote", str(tmp_path / "bad.bin")).exit_code == EXIT_INPUT


def test_inspect_sealed_and_model_decrypt(tmp_path, deployment):
    data = b"weights " * 1000
    sealed = tmp_path / "model.sealed"
    sealing.seal_file(data, sealed, key=deployment.sealing_key, node_id="a.n", name="a.n/model", version=1)
    res = run("inspect", "sealed", str(sealed), "--trust-dir", str(deployment.dir))
    assert res.exit_code == EXIT_OK and "authentic" in res.output and "a.n/model" in res.output
    out = tmp_path / "model.bin"
    res = run(
        "model",
        "decrypt",
        str(sealed),
        "-o",
        str(out),
        "--key-file",
        str(deployment.sealing_key_path),
        "--node",
        "a.n",
        "--name",
        "a.n/model",
    )
    assert res.exit_code == EXIT_OK, res.output
    assert out.read_bytes() == data
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    res = run(
        "model",
        "decrypt",
        str(sealed),
        "-o",
        str(tmp_path / "o2"),
        "--key-file",
        str(deployment.sealing_key_path),
        "--node",
        "a.n",
        "--name",
        "b.n/model",
    )
    assert res.exit_code == EXIT_TRUST and "not 'b.n/model'" in res.output and not (tmp_path / "o2").exists()

    blob = bytearray(sealed.read_bytes())
    blob[-3] ^= 1
    sealed.write_bytes(bytes(blob))
    res = run("inspect", "sealed", str(sealed), "--trust-dir", str(deployment.dir))
    assert res.exit_code == EXIT_TRUST and "REFUSED" in res.output


def test_model_decrypt_without_key_file_is_bad_input(tmp_path):
    (tmp_path / "m").write_bytes(b"x")
    res = run(
        "model",
        "decrypt",
        str(tmp_path / "m"),
        "-o",
        str(tmp_path / "o"),
        "--key-file",
        str(tmp_path / "missing.key"),
        "--node",
        "a",
        "--name",
        "b",
    )
    assert res.exit_code == EXIT_INPUT and "cannot read key file" in res.output


def test_concurrent_trust_init_agrees_on_one_deployment(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from fldsl.runtime.attestation.sim import trust_init

    d = tmp_path / "race"
    with ThreadPoolExecutor(3) as pool:
        deps = list(pool.map(lambda _: trust_init(d), range(3)))
    assert len({dep.root_cert_pem for dep in deps}) == 1 and len({dep.mr_signer for dep in deps}) == 1
    assert sum(len(dep.created) for dep in deps) == 7


def test_incomplete_trust_dir_is_a_clear_error(tmp_path):
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.sim import SimDeployment, trust_init

    d = tmp_path / "t"
    trust_init(d)
    (d / "root_ca.key").unlink()
    with pytest.raises(AttestationError, match="both exist"):
        trust_init(d)
    with pytest.raises(AttestationError, match=r"missing root_ca\.key"):
        SimDeployment.load(d)


def test_inspect_cert_as_a_node_would_names_the_refused_field(tmp_path, deployment, pins):
    from fldsl.artifacts import Policy, dump_json

    from .conftest import SIM

    node_dir = tmp_path / "nodes" / "shop.trainer"
    node_dir.mkdir(parents=True)
    (node_dir / "pins.json").write_text(dump_json(pins))
    policy = Policy(
        pipeline="demo",
        node="shop.trainer",
        attestation=SIM,
        accept_peers=["media.trainer"],
        flows=[],
        max_message_bytes=1 << 20,
    )
    (node_dir / "policy.json").write_text(dump_json(policy))
    good = deployment.backend(mr_enclave=MR_A, isv_prod_id=7, isv_svn=2, debug=False)
    bad = deployment.backend(mr_enclave=b"\3" * 32, isv_prod_id=7, isv_svn=2, debug=False)
    for name, backend in (("good.pem", good), ("bad.pem", bad)):
        ident = ratls.make_identity(backend, node_id="media.trainer", pins_digest=pins.digest())
        (tmp_path / name).write_bytes(ident.cert_pem)
    args = ["--trust-dir", str(deployment.dir), "--node-dir", str(node_dir), "--expect", "media.trainer"]
    res = run("inspect", "cert", str(tmp_path / "good.pem"), *args)
    assert res.exit_code == EXIT_OK, res.output
    assert "accepted:" in res.output and "SIMULATED quote" in res.output
    res = run("inspect", "cert", str(tmp_path / "bad.pem"), "--json", *args)
    assert res.exit_code == EXIT_TRUST
    check = json.loads(res.output)["peer_check"]
    assert (check["accepted"], check["field"], check["actual"]) == (False, "mr_enclave", "03" * 32)
    assert "recompile and redeploy" in check["message"]


def test_trust_init_refuses_symlinks_and_readable_private_keys(tmp_path):
    """A reused key file must be one init would have made: not a link to elsewhere, not readable by others
    (init used to reuse a 0644 key while printing "(private, 0600)")."""
    d = tmp_path / "t" / "media"
    init = ("trust", "init", "--party", "media", "--trust-dir", str(d.parent))
    assert run(*init).exit_code == EXIT_OK
    key = d / "sealing.key"
    key.chmod(0o644)
    res = run(*init)
    assert res.exit_code != EXIT_OK and "readable by others (mode 0644)" in res.output
    assert "chmod 600" in res.output and "Traceback" not in res.output
    key.chmod(0o600)
    elsewhere = tmp_path / "elsewhere.key"
    elsewhere.write_bytes(key.read_bytes())
    elsewhere.chmod(0o600)
    key.unlink()
    key.symlink_to(elsewhere)
    res = run(*init)
    assert res.exit_code != EXIT_OK and "symbolic link" in res.output
    link = tmp_path / "linked-trust"
    link.symlink_to(tmp_path / "target", target_is_directory=True)
    res = run("trust", "init", "--party", "media", "--trust-dir", str(link))
    assert res.exit_code != EXIT_OK and "symbolic link" in res.output and not (tmp_path / "target").exists()


def test_model_decrypt_into_an_existing_folder_writes_the_model_inside(tmp_path, deployment):
    sealed = tmp_path / "a.n_model.sealed"
    sealing.seal_file(b"weights", sealed, key=deployment.sealing_key, node_id="a.n", name="a.n/model",
                      version=1)
    out = tmp_path / "models"
    out.mkdir()
    res = run("model", "decrypt", str(sealed), "-o", str(out), "--key-file", str(deployment.sealing_key_path),
              "--node", "a.n", "--name", "a.n/model")
    assert res.exit_code == EXIT_OK, res.output
    assert (out / "a.n_model.npz").read_bytes() == b"weights"
    assert not (tmp_path / "models.tmp").exists()


def test_check_refuses_an_endless_input_with_a_clear_error():
    res = run("check", "/dev/zero")
    assert res.exit_code == EXIT_INPUT and "not a .flp pipeline" in res.output


def test_model_decrypt_into_a_new_folder_named_with_a_slash(tmp_path, deployment):
    sealed = tmp_path / "a.n_model.sealed"
    sealing.seal_file(b"weights", sealed, key=deployment.sealing_key, node_id="a.n", name="a.n/model",
                      version=1)
    res = run("model", "decrypt", str(sealed), "-o", f"{tmp_path / 'model'}/", "--key-file",
              str(deployment.sealing_key_path), "--node", "a.n", "--name", "a.n/model")
    assert res.exit_code == EXIT_OK, res.output
    assert (tmp_path / "model" / "a.n_model.npz").read_bytes() == b"weights"
