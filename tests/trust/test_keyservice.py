"""The data owner's key service (`fldsl keys serve`) as a real process on 127.0.0.1, and its client: only an
attested, granted enclave gets the key, and only the holder of the certificate's private key can open it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import grpc
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fldsl.artifacts import Pins, load_model, node_dir
from fldsl.cli import EXIT_INPUT, main
from fldsl.runtime import keyservice as ks
from fldsl.runtime.attestation.ratls import LocalIdentity, make_identity
from fldsl.runtime.attestation.sim import SimDeployment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import buildkit

GRANTED, OTHER = "shop.trainer", "media.trainer"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return buildkit.vertical_build(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def pins(build: Path) -> Pins:
    return load_model(Pins, node_dir(build, GRANTED) / "pins.json")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> SimDeployment:
    """Party shop's folder (the granted node's party, which runs the key service); media's beside it, each
    pinning the other."""
    from fldsl.runtime.attestation.parties import local_deployment

    root = tmp_path_factory.mktemp("parties")
    local_deployment(root, ["media", "shop"])
    return SimDeployment.load(root / "shop")


@pytest.fixture(scope="module")
def data_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("owner") / "data.key"
    assert CliRunner().invoke(main, ["data", "keygen", str(path)]).exit_code == 0
    return path, path.read_bytes()


@pytest.fixture(scope="module")
def service(build: Path, data_key: tuple[Path, bytes], deployment: SimDeployment,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`fldsl keys serve` in its own process; yields its address and its log file."""
    log = tmp_path_factory.mktemp("service") / "keys.log"
    cmd = [sys.executable, "-u", "-c", "from fldsl.cli import main; main()", "keys", "serve", str(build),
           "--key", f"data={data_key[0]}", "--grant", f"data={GRANTED}", "--listen", "127.0.0.1:0",
           "--trust-dir", str(deployment.dir.parent)]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("key service listening on 127.0.0.1:"), line + log.read_text()
        yield line.split()[4], log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0 and "stopped" in out


def identity(deployment: SimDeployment, pins: Pins, node: str, mr_enclave: bytes | None = None
             ) -> LocalIdentity:
    """An RA-TLS identity with the sim backend, reporting the pinned measurement unless told otherwise."""
    pinned = pins.nodes[node]
    deployment = SimDeployment.load(deployment.dir.parent / node.split(".")[0])  # the node's party's keys
    backend = deployment.backend(mr_enclave=mr_enclave or bytes.fromhex(pinned.mr_enclave[0]),
                                 isv_prod_id=pinned.isv_prod_id, isv_svn=pinned.isv_svn_min, debug=False)
    return make_identity(backend, node_id=node, pins_digest=pins.digest())


def test_attested_granted_node_gets_the_key_and_installs_it(service, deployment, pins, data_key, tmp_path):
    address, _ = service
    me = identity(deployment, pins, GRANTED)
    key = ks.fetch_key(address, identity=me, node_id=GRANTED, name="data", timeout=30)
    assert key == data_key[1] and len(key) == 16
    # Gramine's /dev/attestation/keys/<name> exists when the manifest declares the key name.
    (tmp_path / "data").touch()
    ks.install_gramine_key("data", key, root=tmp_path)
    assert (tmp_path / "data").read_bytes() == key


def test_a_different_measurement_is_refused_naming_mr_enclave(service, deployment, pins):
    address, _ = service
    rogue = identity(deployment, pins, GRANTED, mr_enclave=os.urandom(32))
    with pytest.raises(ks.KeyRefused) as e:
        ks.fetch_key(address, identity=rogue, node_id=GRANTED, name="data", timeout=30)
    assert e.value.field == "mr_enclave" and "mr_enclave" in str(e.value)
    assert pins.nodes[GRANTED].mr_enclave[0] in str(e.value)


def test_an_attested_node_without_a_grant_is_refused_naming_the_grant(service, deployment, pins):
    address, _ = service
    other = identity(deployment, pins, OTHER)
    with pytest.raises(ks.KeyRefused) as e:
        ks.fetch_key(address, identity=other, node_id=OTHER, name="data", timeout=30)
    assert e.value.field == "grant" and "not granted to media.trainer" in str(e.value)
    with pytest.raises(ks.KeyRefused) as e:  # a key that does not exist looks the same: not granted
        ks.fetch_key(address, identity=identity(deployment, pins, GRANTED), node_id=GRANTED, name="labels",
                     timeout=30)
    assert e.value.field == "grant"


def test_a_replayed_certificate_without_the_private_key_opens_nothing(service, deployment, pins):
    address, _ = service
    genuine = identity(deployment, pins, GRANTED)
    thief_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    replay = LocalIdentity(key_pem=thief_key, cert_pem=genuine.cert_pem, cert_der=genuine.cert_der,
                           node_id=GRANTED)
    with pytest.raises(ks.KeyReplyError, match="does not open with this enclave's key"):
        ks.fetch_key(address, identity=replay, node_id=GRANTED, name="data", timeout=30)


def _raw(address: str, payload: bytes) -> ks.KeyServiceError:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 4 << 20)]) as channel:
        try:
            channel.unary_unary(ks.METHOD)(payload, timeout=30, wait_for_ready=True)
        except grpc.RpcError as e:
            return ks._client_error(e, address, "data")
    raise AssertionError("the service answered")


def test_oversized_and_malformed_requests_are_refused(service, deployment, pins):
    address, _ = service
    cert = identity(deployment, pins, GRANTED).cert_pem
    big_cert = cert + b"\n" * (ks.MAX_CERT_BYTES + 1 - len(cert))
    refusal = _raw(address, cbor2.dumps({"v": 1, "cert": big_cert, "name": "data", "node": GRANTED}))
    assert isinstance(refusal, ks.KeyRefused) and refusal.field == "certificate", refusal
    assert f"at most {ks.MAX_CERT_BYTES} bytes" in str(refusal)
    too_big = _raw(address, b"\0" * (ks.MAX_REQUEST_BYTES + 1))
    assert isinstance(too_big, ks.KeyRefused) and too_big.field == "request" and "oversized" in str(too_big)
    huge = _raw(address, b"\0" * (ks.MAX_WIRE_BYTES + 1))  # refused by gRPC before the handler
    assert isinstance(huge, ks.KeyRefused) and huge.field == "request"
    bad_name = cbor2.dumps({"v": 1, "cert": cert, "name": "../../etc", "node": GRANTED})
    for payload in (b"\xff\x00garbage", bad_name, cbor2.dumps([1, 2, 3])):
        bad = _raw(address, payload)
        assert isinstance(bad, ks.KeyRefused) and bad.field == "request", bad
    not_a_cert = cbor2.dumps({"v": 1, "cert": b"not a cert", "name": "data", "node": GRANTED})
    garbage_cert = _raw(address, not_a_cert)
    assert isinstance(garbage_cert, ks.KeyRefused) and garbage_cert.field == "certificate"


def test_the_log_names_node_and_field_and_never_the_key(service, deployment, pins, data_key):
    address, log = service
    ks.fetch_key(address, identity=identity(deployment, pins, GRANTED), node_id=GRANTED, name="data",
                 timeout=30)
    with pytest.raises(ks.KeyRefused):
        ks.fetch_key(address, identity=identity(deployment, pins, OTHER), node_id=OTHER, name="data",
                     timeout=30)
    deadline = time.monotonic() + 10
    while "refused key data to media.trainer" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert f"granted key data to {GRANTED}" in text and "SIMULATED" in text
    assert "refused key data to media.trainer: field grant" in text
    key = data_key[1]
    assert key.hex() not in text and key.hex().upper() not in text and repr(key)[2:-1] not in text


def test_an_unreachable_service_is_reported_as_such(deployment, pins):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ks.KeyServiceUnavailable, match="unreachable"):
        ks.fetch_key(f"127.0.0.1:{port}", identity=identity(deployment, pins, GRANTED), node_id=GRANTED,
                     name="data", timeout=1)


# ---------------------------------------------------------------------------------------------------------
# in-process: the service's own checks, installing keys, the CLI's input errors
# ---------------------------------------------------------------------------------------------------------


def test_service_refuses_bad_configuration(build, deployment):
    verifier = ks.verifier_from_build(build, [GRANTED], deployment.dir)
    with pytest.raises(ValueError, match="16 bytes"):
        ks.KeyService({"data": b"short"}, {"data": [GRANTED]}, verifier)
    with pytest.raises(ValueError, match="not served"):
        ks.KeyService({"data": bytes(16)}, {"labels": [GRANTED]}, verifier)
    service = ks.KeyService({"data": bytes(16)}, {"data": [GRANTED]}, verifier)
    assert "data" in repr(service) and "\\x00" not in repr(service)
    with pytest.raises(ValueError, match=r"no node `nobody\.x`"):
        ks.verifier_from_build(build, ["nobody.x"], deployment.dir)


def test_install_gramine_key_checks_name_length_and_declaration(tmp_path):
    with pytest.raises(ks.KeyServiceError, match="declares no key `data`"):
        ks.install_gramine_key("data", bytes(16), root=tmp_path)
    with pytest.raises(ValueError, match="16 bytes"):
        ks.install_gramine_key("data", bytes(32), root=tmp_path)
    with pytest.raises(ValueError, match="bad key name"):
        ks.install_gramine_key("../data", bytes(16), root=tmp_path)
    (tmp_path / "target").touch()
    (tmp_path / "data").symlink_to(tmp_path / "target")
    with pytest.raises(ks.KeyServiceError):
        ks.install_gramine_key("data", bytes(16), root=tmp_path)
    assert (tmp_path / "target").read_bytes() == b""


def test_keys_serve_input_errors(build, data_key, deployment, tmp_path):
    def serve(*args: str):
        args = ("keys", "serve", str(build), "--trust-dir", str(deployment.dir.parent), *args)
        return CliRunner().invoke(main, list(args))

    res = serve("--key", f"data={data_key[0]}", "--grant", "data=nobody.x")
    assert res.exit_code == EXIT_INPUT and "no node `nobody.x`" in res.output
    (tmp_path / "long.key").write_bytes(bytes(32))
    res = serve("--key", f"data={tmp_path / 'long.key'}", "--grant", f"data={GRANTED}")
    assert res.exit_code == EXIT_INPUT and "holds 32 bytes" in res.output
    res = serve("--key", f"data={data_key[0]}", "--grant", f"dta={GRANTED}")
    assert res.exit_code == EXIT_INPUT and "did you mean `data`" in res.output
    res = serve("--key", f"data={data_key[0]}", "--grant", f"data={GRANTED}", "--listen", "nowhere")
    assert res.exit_code == EXIT_INPUT and "HOST:PORT" in res.output
    res = CliRunner().invoke(main, ["keys", "serve", str(build), "--trust-dir", str(tmp_path / "none"),
                                    "--key", f"data={data_key[0]}", "--grant", f"data={GRANTED}"])
    assert res.exit_code == EXIT_INPUT and "fldsl trust init" in res.output


# ---------------------------------------------------------------------------------------------------------
# the whole path under gramine-direct: attest, fetch, install the key, read the encrypted mount
# ---------------------------------------------------------------------------------------------------------

MANIFEST = """\
libos.entrypoint = "{python}"
loader.entrypoint.uri = "file:{{{{ gramine.libos }}}}"
loader.env.LD_LIBRARY_PATH = "/lib:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"
loader.insecure__use_cmdline_argv = true
fs.root.uri = "file:/"
fs.mounts = [
  {{ path = "/lib", uri = "file:{{{{ gramine.runtimedir() }}}}" }},
  {{ type = "encrypted", path = "/fldsl/data", uri = "file:data", key_name = "data" }},
]
sgx.file_check_policy = "allow_all_but_log"
"""

IN_ENCLAVE = """\
import site
for d in {site_dirs!r}:
    site.addsitedir(d)
from pathlib import Path
from fldsl.artifacts import Pins, load_model
from fldsl.runtime.attestation.ratls import make_identity
from fldsl.runtime.attestation.sim import SimDeployment
from fldsl.runtime.keyservice import fetch_key, install_gramine_key

pins = load_model(Pins, Path({pins!r}))
pinned = pins.nodes[{node!r}]
backend = SimDeployment.load({trust!r}).backend(mr_enclave=bytes.fromhex(pinned.mr_enclave[0]),
    isv_prod_id=pinned.isv_prod_id, isv_svn=pinned.isv_svn_min, debug=False)
me = make_identity(backend, node_id={node!r}, pins_digest=pins.digest())
install_gramine_key("data", fetch_key({address!r}, identity=me, node_id={node!r}, name="data", timeout=30))
Path({out!r}).write_text(open("/fldsl/data/train.csv").read())
"""


@pytest.mark.skipif(not (shutil.which("gramine-direct") and shutil.which("gramine-manifest")
                         and shutil.which("gramine-sgx-pf-crypt")), reason="Gramine is not installed")
def test_under_gramine_direct_the_node_gets_its_key_and_reads_its_encrypted_data(
        service, deployment, build, data_key, tmp_path, monkeypatch):
    import site

    address, _ = service
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    plain = "example_id,x,label\n" + "".join(f"{i},{i / 7:.3f},{i % 2}\n" for i in range(300))
    (tmp_path / "plain.csv").write_text(plain)
    res = CliRunner().invoke(main, ["data", "encrypt", "plain.csv", "-o", "data/train.csv", "--key",
                                    str(data_key[0])])
    assert res.exit_code == 0, res.output
    (tmp_path / "node.manifest.template").write_text(MANIFEST.format(python=os.path.realpath(sys.executable)))
    subprocess.run(["gramine-manifest", "node.manifest.template", "node.manifest"], check=True)
    pins_file = str(node_dir(build, GRANTED) / "pins.json")
    script = IN_ENCLAVE.format(site_dirs=site.getsitepackages(), pins=pins_file, node=GRANTED,
                               trust=str(deployment.dir), address=address, out=str(tmp_path / "out.csv"))
    (tmp_path / "node.py").write_text(script)
    proc = subprocess.run(["gramine-direct", "node", str(tmp_path / "node.py")], capture_output=True,
                          text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.csv").read_text() == plain


def test_serve_json_streams_its_address_and_its_end(build, data_key, deployment):
    """`--json`: JSON lines on stdout, the address first (whoever started the service reads it), then done."""
    cmd = [sys.executable, "-u", "-c", "from fldsl.cli import main; main()", "keys", "serve", str(build),
           "--key", f"data={data_key[0]}", "--grant", f"data={GRANTED}", "--listen", "127.0.0.1:0",
           "--trust-dir", str(deployment.dir.parent), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = json.loads(proc.stdout.readline() if proc.stdout else "{}")
        assert first["command"] == "keys serve" and first["event"] == "listening", first
        assert first["address"].startswith("127.0.0.1:") and first["grants"] == {"data": [GRANTED]}
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    last = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0 and last["event"] == "done" and last["exit_code"] == 0
