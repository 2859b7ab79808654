"""Fixtures for the trust tests: one simulated deployment per session (RSA-3072 key generation is slow)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fldsl.artifacts import AttestationRequirement, Identity, Pins
from fldsl.runtime.attestation.parties import init_party
from fldsl.runtime.attestation.sim import SimBackend, SimDeployment

VECTORS = Path(__file__).parent / "vectors"
MR_A = hashlib.sha256(b"node a build").digest()
MR_B = hashlib.sha256(b"node b build").digest()


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> SimDeployment:
    """Party media's folder. The verifier tests let its root stand for every party (sim_roots)."""
    return init_party(tmp_path_factory.mktemp("trust") / "deploy", "media")[0]


@pytest.fixture(scope="session")
def other_deployment(tmp_path_factory: pytest.TempPathFactory) -> SimDeployment:
    """Party media's folder of another deployment: another root, same party name."""
    return init_party(tmp_path_factory.mktemp("trust") / "other", "media")[0]


@pytest.fixture
def pins(deployment: SimDeployment) -> Pins:
    signer = deployment.mr_signer.hex()
    return Pins(
        pipeline="demo",
        nodes={
            "media.trainer": Identity(
                mr_enclave=[MR_A.hex()], mr_signer=signer, isv_prod_id=7, isv_svn_min=2
            ),
            "shop.trainer": Identity(mr_enclave=[MR_B.hex()], mr_signer=signer, isv_prod_id=7, isv_svn_min=2),
        },
    )


@pytest.fixture
def backend_a(deployment: SimDeployment) -> SimBackend:
    return deployment.backend(mr_enclave=MR_A, isv_prod_id=7, isv_svn=2, debug=False)


SIM = AttestationRequirement(mode="sim")
DCAP = AttestationRequirement(mode="dcap")
