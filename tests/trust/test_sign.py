"""`--sign`: fake Gramine tools (same arguments and JSON shape) on PATH; real pins land in every node."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fldsl.artifacts import (
    AttestationRequirement,
    Identity,
    NodeSummary,
    Pins,
    PipelineFile,
    Policy,
    dump_json,
    load_model,
)
from fldsl.compiler.sign import GramineMissing, SignError, sign_build
from fldsl.measurement import mr_signer_of, sim_mr_enclave_gramine
from fldsl.runtime.attestation.crypto import private_pem

FAKES = Path(__file__).parent / "fake_gramine"
NODES = {"media.trainer": ("media", 7, 2), "shop.trainer": ("shop", 7, 2)}
TEMPLATE = """# tiny template for {node}
libos.entrypoint = "{{{{ entrypoint }}}}"
loader.env.LD_LIBRARY_PATH = "/lib:{{{{ arch_libdir }}}}"
sgx.isvprodid = {prod}
sgx.isvsvn = {svn}
sgx.debug = false
sgx.remote_attestation = "dcap"
sgx.trusted_files = [{{ uri = "file:node/plan.json", sha256 = "{plan_sha}" }}]
"""


@pytest.fixture(autouse=True)
def small_enclave(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about signing (tools, pins, cross-checks): a two-file enclave instead of the
    interpreter probe and the bytecode compile, which tests/manifests and the Gramine e2e tests cover."""
    from fldsl.compiler import sign
    from fldsl.compiler.enclave_files import EnclaveFiles

    def fake_files(entry: str) -> EnclaveFiles:
        return EnclaveFiles(entrypoint=entry, mounts=["/usr"], trusted=[entry], distributions=[])

    monkeypatch.setattr(sign, "enclave_files", fake_files)
    monkeypatch.setattr(sign, "build_pycache", lambda entry, sources, dest: [])


@pytest.fixture
def build(tmp_path: Path) -> Path:
    b = tmp_path / "build" / "demo"
    pins = Pins(
        pipeline="demo",
        nodes={
            n: Identity(mr_enclave=["aa" * 32], mr_signer=None, isv_prod_id=p, isv_svn_min=s)
            for n, (_, p, s) in NODES.items()
        },
    )
    summaries = []
    for n, (party, prod, svn) in NODES.items():
        d = b / "nodes" / n
        d.mkdir(parents=True)
        (d / "pins.json").write_text(dump_json(pins))
        (d / "policy.json").write_text(dump_json(Policy(
            pipeline="demo", node=n, attestation=AttestationRequirement(mode="sim"), accept_peers=[],
            flows=[], max_message_bytes=1 << 20)))
        (d / f"{n}.manifest.template").write_text(
            TEMPLATE.format(node=n, prod=prod, svn=svn, plan_sha="0" * 64)
        )
        summaries.append(
            NodeSummary(
                id=n,
                party=party,
                role="vertical.passive",
                measurement="aa" * 32,
                files={"pins.json": "x", "plan.json": "y"},
            )
        )
    pipeline = PipelineFile(
        pipeline="demo",
        digest="d",
        source="demo.flp",
        params={},
        scenario="vertical",
        parties={"media": ["media.trainer"], "shop": ["shop.trainer"]},
        nodes=summaries,
        flows=[],
        graph_nodes=[],
        graph_edges=[],
        ir={},
    )
    (b / "pipeline.json").write_text(dump_json(pipeline))
    return b


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in FAKES.iterdir():
        text = tool.read_text().replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1)
        (bin_dir / tool.name).write_text(text)
        (bin_dir / tool.name).chmod(stat.S_IRWXU)
    log = tmp_path / "tools.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_GRAMINE_LOG", str(log))
    return log


@pytest.fixture
def key(tmp_path: Path, deployment) -> Path:
    path = tmp_path / "enclave-key.pem"
    path.write_bytes(private_pem(deployment.signing_key))  # an RSA-3072, e=3 key
    return path


def test_sign_pins_real_identities_into_every_node(build, fake_tools, key, deployment):
    signed = sign_build(build, key, entrypoint="/usr/bin/python3", arch_libdir="/lib/x86_64-linux-gnu")
    assert [s.node_id for s in signed] == sorted(NODES)
    texts = {(build / "nodes" / n / "pins.json").read_text() for n in NODES}
    assert len(texts) == 1, "pins.json must stay identical in every node"
    pins = load_model(Pins, build / "nodes" / "media.trainer" / "pins.json")
    signer = mr_signer_of(deployment.signing_key).hex()
    for n in NODES:
        ident = pins.nodes[n]
        manifest = (build / "nodes" / n / f"{n}.manifest").read_bytes()
        assert ident.mr_enclave == [hashlib.sha256(manifest + b"\0").hexdigest()]
        assert (
            ident.mr_signer,
            ident.isv_prod_id,
            ident.isv_svn_min,
            ident.debug,
            ident.measurement_kind,
        ) == (signer, 7, 2, False, "sgx")
        assert b"/usr/bin/python3" in manifest and b"{{" not in manifest
        assert (build / "nodes" / n / f"{n}.sig").stat().st_size == 1808
    pins_sha = hashlib.sha256(next(iter(texts)).encode()).hexdigest()
    pipeline = load_model(PipelineFile, build / "pipeline.json")
    for s in pipeline.nodes:
        assert s.measurement_kind == "sgx" and [s.measurement] == pins.nodes[s.id].mr_enclave
        assert s.files["pins.json"] == pins_sha and s.files["plan.json"] == "y"
        assert ident.sim_mr_enclave == sim_mr_enclave_gramine(manifest)
    log = fake_tools.read_text().splitlines()
    assert any(
        line.startswith("gramine-sgx-sign --key ")
        and "--manifest node/media.trainer.manifest --output node/media.trainer.manifest.sgx" in line
        for line in log
    )
    assert "gramine-sgx-sigstruct-view --output-format json node/media.trainer.sig" in log
    # fldsl renders the template (stage 2) and gramine-manifest turns the rendering into the manifest.
    assert "gramine-manifest media.trainer.rendered.toml node/media.trainer.manifest" in log


def test_signed_pins_take_a_simulated_quote_only_of_the_signed_manifest(build, fake_tools, key, deployment):
    """Under gramine-direct a signed node reports a simulated quote with the simulated measurement of its
    signed manifest; a simulated quote claiming anything else (the real MRENCLAVE included) is refused."""
    from fldsl.artifacts import AttestationRequirement
    from fldsl.runtime.attestation import ratls
    from fldsl.runtime.attestation.verify import PeerRefused, PeerVerifier

    sign_build(build, key, entrypoint="/usr/bin/python3", arch_libdir="/lib")
    pins = load_model(Pins, build / "nodes" / "shop.trainer" / "pins.json")
    v = PeerVerifier(
        pins,
        AttestationRequirement(mode="sim"),
        sim_roots=dict.fromkeys(pins.parties(), deployment.root_cert_pem),
        own_pins_digest=pins.digest(),
    )

    def cert(mr_enclave: str) -> bytes:
        backend = deployment.backend(mr_enclave=bytes.fromhex(mr_enclave), isv_prod_id=7, isv_svn=2,
                                     debug=False)
        return ratls.make_identity(backend, node_id="media.trainer", pins_digest=pins.digest()).cert_pem

    ident = pins.nodes["media.trainer"]
    assert ident.sim_mr_enclave is not None
    assert v.verify(cert(ident.sim_mr_enclave), "media.trainer").simulated
    with pytest.raises(PeerRefused) as info:
        v.verify(cert(ident.mr_enclave[0]), "media.trainer")
    assert info.value.field == "mr_enclave"
    # A pipeline that requires real SGX refuses the simulated quote outright.
    strict = PeerVerifier(pins, AttestationRequirement(mode="dcap"),
                          sim_roots=dict.fromkeys(pins.parties(), deployment.root_cert_pem),
                          own_pins_digest=pins.digest())
    with pytest.raises(PeerRefused) as info:
        strict.verify(cert(ident.sim_mr_enclave), "media.trainer")
    assert info.value.field == "attestation_mode"


def test_without_gramine_a_clear_environment_error(build, key, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    before = (build / "nodes" / "media.trainer" / "pins.json").read_text()
    with pytest.raises(GramineMissing) as info:
        sign_build(build, key)
    assert info.value.exit_code == 4 and "gramine-sgx-sign" in str(info.value)
    assert (build / "nodes" / "media.trainer" / "pins.json").read_text() == before


def test_mrsigner_cross_check_catches_a_mismatch_and_writes_nothing(build, fake_tools, key, monkeypatch):
    monkeypatch.setenv("FAKE_MRSIGNER", "cd" * 32)
    before = {n: (build / "nodes" / n / "pins.json").read_text() for n in NODES}
    with pytest.raises(SignError, match="MRSIGNER"):
        sign_build(build, key, entrypoint="/x", arch_libdir="/lib")
    assert {n: (build / "nodes" / n / "pins.json").read_text() for n in NODES} == before


def test_signing_key_must_be_rsa3072_e3(build, fake_tools, tmp_path):
    weak = tmp_path / "weak.pem"
    weak.write_bytes(private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    with pytest.raises(SignError, match="RSA-3072 with public exponent 3"):
        sign_build(build, weak)
    with pytest.raises(SignError, match="not found"):
        sign_build(build, tmp_path / "nope.pem")


def test_isv_values_must_match_the_trust_block(build, fake_tools, key):
    t = build / "nodes" / "shop.trainer" / "shop.trainer.manifest.template"
    t.write_text(t.read_text().replace("sgx.isvprodid = 7", "sgx.isvprodid = 9"))
    with pytest.raises(SignError, match="isv_prod_id 9 != 7"):
        sign_build(build, key, entrypoint="/x", arch_libdir="/lib")


def test_fake_tool_json_shape_matches_gramine(build, fake_tools, key):
    """Guard the fake itself: the JSON keys are the ones gramine-sgx-sign's --output JSON has."""
    sign_build(build, key, entrypoint="/x", arch_libdir="/lib")
    import subprocess

    out = subprocess.run(
        [
            shutil.which("gramine-sgx-sigstruct-view"),
            "--output-format",
            "json",
            str(build / "nodes" / "shop.trainer" / "shop.trainer.sig"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert set(json.loads(out)) >= {"mr_signer", "mr_enclave", "isv_prod_id", "isv_svn", "debug_enclave"}


def test_sign_a_really_compiled_pipeline(tmp_path, fake_tools, key, deployment):
    """The compiler's own build dir (template names, pipeline.json file keys) signs end to end."""
    from fldsl.api import compile_pipeline

    root = Path(__file__).resolve().parents[2]
    result = compile_pipeline(root / "pipelines" / "vertical_wide_deep.flp", tmp_path / "out", {})
    build = Path(result.build_dir)
    signed = sign_build(build, key, entrypoint=sys.executable, arch_libdir="/lib/x86_64-linux-gnu")
    node_ids = sorted(p.name for p in (build / "nodes").iterdir())
    assert [s.node_id for s in signed] == node_ids and len(node_ids) >= 2
    texts = {(build / "nodes" / n / "pins.json").read_text() for n in node_ids}
    assert len(texts) == 1
    pins = Pins.model_validate_json(texts.pop())
    assert all(
        i.measurement_kind == "sgx" and i.mr_signer == mr_signer_of(deployment.signing_key).hex()
        for i in pins.nodes.values()
    )
    pipeline = load_model(PipelineFile, build / "pipeline.json")
    assert {s.id: [s.measurement] for s in pipeline.nodes} == {n: i.mr_enclave for n, i in pins.nodes.items()}
    for s in pipeline.nodes:
        assert s.files["pins.json"] == hashlib.sha256(dump_json(pins).encode()).hexdigest()


def test_a_dcap_pipeline_is_not_signed_where_nodes_could_not_verify_real_quotes(build, fake_tools, key,
                                                                                 monkeypatch):
    """attestation dcap: every node verifies its peers' quotes with Intel's QVL inside the enclave; signing
    where the library is missing would make enclaves that can never accept a real peer (fail closed)."""
    from fldsl.compiler import enclave_files

    for n in NODES:
        p = build / "nodes" / n / "policy.json"
        p.write_text(p.read_text().replace('"mode": "sim"', '"mode": "dcap"'))
    monkeypatch.setattr(enclave_files, "_ldconfig_path", lambda soname: None)
    before = (build / "nodes" / "media.trainer" / "pins.json").read_text()
    with pytest.raises(SignError, match=r"libsgx_dcap_quoteverify\.so\.1 is not installed"):
        sign_build(build, key, entrypoint="/usr/bin/python3", arch_libdir="/lib")
    assert (build / "nodes" / "media.trainer" / "pins.json").read_text() == before


def test_a_dcap_node_trusts_the_qvl_and_names_it_in_its_environment(build, fake_tools, key, monkeypatch,
                                                                   tmp_path):
    """Inside the enclave ctypes.util.find_library finds nothing (no ldconfig cache, no compiler): the
    signed manifest names the QVL by path (FLDSL_QVL_LIBRARY) and trusts it."""
    from fldsl.compiler import enclave_files

    lib = tmp_path / "libsgx_dcap_quoteverify.so.1"
    lib.write_bytes(b"not really a library")
    for n in NODES:
        p = build / "nodes" / n / "policy.json"
        p.write_text(p.read_text().replace('"mode": "sim"', '"mode": "dcap"'))
        t = build / "nodes" / n / f"{n}.manifest.template"
        t.write_text(t.read_text() + '{% if qvl_library %}'
                     'loader.env.FLDSL_QVL_LIBRARY = "{{ qvl_library }}"\n{% endif %}')
    monkeypatch.setattr(enclave_files, "_ldconfig_path",
                        lambda soname: str(lib) if soname == enclave_files.QVL_SONAME else None)
    sign_build(build, key, entrypoint="/usr/bin/python3", arch_libdir="/lib")
    manifest = (build / "nodes" / "media.trainer" / "media.trainer.manifest").read_text()
    assert f'loader.env.FLDSL_QVL_LIBRARY = "{lib}"' in manifest
