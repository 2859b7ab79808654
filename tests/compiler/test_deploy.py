"""`fldsl compile --target compose|kubernetes`: deployment files beside the build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fldsl.api import compile_pipeline

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def test_compose(tmp_path: Path) -> None:
    r = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "b", target="compose")
    assert "deploy/compose/docker-compose.yml" in r.files and "deploy/addresses.json" in r.files
    addresses = json.loads((r.build_dir / "deploy/addresses.json").read_text())
    assert addresses == {
        "media.trainer": {"host": "media-trainer", "port": 7443, "bootstrap_port": 7444},
        "shop.trainer": {"host": "shop-trainer", "port": 7443, "bootstrap_port": 7444},
    }
    text = (r.build_dir / "deploy/compose/docker-compose.yml").read_text()
    assert "  media-trainer:\n" in text and "  shop-trainer:\n" in text
    assert '"--node", "media.trainer"' in text and '"--attestation", "sim"' in text
    assert '"../../nodes/media.trainer:/fldsl/node:ro"' in text
    # The passive party dials the active one, so it starts after it.
    media = text[text.index("  media-trainer:") : text.index("  shop-trainer:")]
    assert 'depends_on:\n      - "shop-trainer"' in media
    # Deployment files are not part of the digest: same digest as a plain compile.
    plain = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "plain")
    assert plain.digest == r.digest


def test_compose_dcap_mounts_the_aesm_socket_and_the_working_folder(tmp_path: Path) -> None:
    src = (PIPELINES / "vertical_wide_deep.flp").read_text().replace("attestation sim", "attestation dcap")
    f = tmp_path / "v.flp"
    f.write_text(src)
    r = compile_pipeline(f, tmp_path / "b", target="compose")
    text = (r.build_dir / "deploy/compose/docker-compose.yml").read_text()
    assert '"/var/run/aesmd:/var/run/aesmd"' in text and '"/dev/sgx_enclave"' in text
    assert 'working_dir: "/fldsl/work"' in text
    assert '"../../nodes/media.trainer:/fldsl/work/node:ro"' in text
    assert '"../addresses.json:/fldsl/work/run/addresses.json:ro"' in text
    assert 'command: ["gramine-sgx", "node/trainer"]' in text


def test_addresses_file_is_what_the_runtime_reads(tmp_path: Path) -> None:
    from fldsl.runtime.transport.addresses import load_addresses

    r = compile_pipeline(PIPELINES / "distributed_dlrm.flp", tmp_path / "b", target="compose")
    addrs = load_addresses(r.build_dir / "deploy/addresses.json")
    assert addrs["cloud.worker2"].secure_target() == "cloud-worker2:7443"


def test_kubernetes_dcap(tmp_path: Path) -> None:
    src = (PIPELINES / "horizontal_dlrm.flp").read_text().replace("attestation sim", "attestation dcap")
    f = tmp_path / "horizontal_dlrm.flp"
    f.write_text(src)
    r = compile_pipeline(f, tmp_path / "b", target="kubernetes")
    files = [p for p in r.files if p.startswith("deploy/kubernetes/")]
    assert files == [f"deploy/kubernetes/bank{i}-worker.yaml" for i in range(1, 5)] + [
        "deploy/kubernetes/hub-ps.yaml"
    ]
    text = (r.build_dir / "deploy/kubernetes/hub-ps.yaml").read_text()
    assert text.count("\n---\n") == 2
    assert 'kind: "Deployment"' in text and 'kind: "Service"' in text
    assert 'sgx.intel.com/epc: "8G"' in text
    assert '- "gramine-sgx"\n            - "node/ps"' in text
    # gramine-sgx runs in the working folder the signed manifest's relative URIs expect, and reaches the
    # host's AESM service (no quote without it).
    assert 'workingDir: "/fldsl/work"' in text and 'mountPath: "/fldsl/work/node"' in text
    assert 'mountPath: "/var/run/aesmd"' in text and 'path: "/var/run/aesmd"' in text
    again = compile_pipeline(f, tmp_path / "c", target="kubernetes")
    assert (again.build_dir / "deploy/kubernetes/hub-ps.yaml").read_text() == text


def test_declared_relative_data_is_mounted_where_the_node_looks(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema block keeps the path as declared; a relative one is opened from the node's working folder,
    so the container gets the folder there (from the folder it names where compile ran)."""
    monkeypatch.chdir(tmp_path)
    r = compile_pipeline(PIPELINES / "fate_breast_vertical.flp", tmp_path / "b", {"data_dir": "data/fate"},
                         target="compose")
    text = (r.build_dir / "deploy/compose/docker-compose.yml").read_text()
    assert f'"{Path.cwd()}/data/fate:/fldsl/node/data/fate:ro"' in text
    r = compile_pipeline(PIPELINES / "fate_breast_vertical.flp", tmp_path / "k", {"data_dir": "/srv/fate"},
                         target="kubernetes")
    text = (r.build_dir / "deploy/kubernetes/guest-trainer.yaml").read_text()
    assert 'mountPath: "/srv/fate"' in text and 'path: "/srv/fate"' in text
