"""``fldsl compile --target kubernetes|compose [--party P]``: a party's deployment (docs/deploy.md).

Each party of a pipeline deploys its own nodes, on its own cluster or host, with its own trust material; the
parties meet only over the network, where their nodes attest each other. So the files are written per party,
``deploy/<target>/<party>/``, each folder self-contained: without ``--party``, one folder for every party.
Nothing here is part of any node's measurement nor of the pipeline digest (where a node runs is not a security
property: peers are identified by attestation).

What every node gets, on both targets:

- one container from one image (``docker build -t fldsl:<version> .`` at the repo root; the ``sgx`` stage
  adds Gramine), running as a non-root user with a read-only root filesystem and no capabilities;
- its node folder (read-only), ``addresses.json`` (this party's nodes listen on ``0.0.0.0``: in a container
  loopback is unreachable from the peers), a volume for its sealed checkpoints and models whose name carries
  the pipeline's short digest (the first 12 hex digits: a recompiled pipeline never mounts another digest's
  volume), and its party's trust folder only (``attestation sim``: ``fldsl trust init --party P`` makes
  ``.fldsl/trust/P/``; never another party's);
- a restart on failure that resumes from the checkpoint on that volume, and a finished node stays finished.

``attestation sim`` runs ``python3 -I -m fldsl.runtime.node`` (isolated mode: the node refuses to start
otherwise). ``attestation dcap`` runs ``gramine-sgx node/<node>`` in the working folder its signed manifest
expects (``node/``, ``run/``, ``pycache/``, ``data/``, ``trust/``: fldsl.runtime.enclave_runner) with the SGX
devices and the host's AESM socket (``/var/run/aesmd``: no quote without it); its command line is fixed by the
signed manifest, which is why ``listen`` travels in addresses.json rather than as ``--listen``.

YAML is written by hand (deterministic, no extra dependency): every string is a JSON string with the
characters YAML reads differently escaped, which is a valid YAML double-quoted scalar.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fldsl.compiler import lower
from fldsl.compiler.deploy_compose import compose_party
from fldsl.compiler.deploy_kubernetes import kubernetes_party
from fldsl.compiler.deploy_party import (
    BOOTSTRAP_PORT,
    EXPOSE,
    IMAGE,
    MEASURED_PEAK_KIB,
    NODEPORTS,
    PORT,
    SGX_IMAGE,
    TARGETS,
    UID,
    DeployError,
    Party,
    PeerAddress,
    _services,
    load_agreed_addresses,
    memory_mib,
    service_name,
    short_digest,
)
from fldsl.compiler.ir import Program
from fldsl.diagnostics import did_you_mean

# The targets' files are written by deploy_kubernetes and deploy_compose over what deploy_party shares;
# these names stay importable from here (fldsl.api, the tests).
__all__ = [
    "BOOTSTRAP_PORT", "EXPOSE", "IMAGE", "MEASURED_PEAK_KIB", "PORT", "TARGETS", "UID", "DeployError",
    "DeployOptions", "DeployResult", "PeerAddress", "deploy_options", "memory_mib", "service_name",
    "short_digest", "write_deploy",
]


@dataclass
class DeployResult:
    files: list[str]  # relative to the build folder
    notes: list[str]  # what the operator must still do (printed as warnings)


@dataclass(frozen=True)
class DeployOptions:
    """Checked ``--target`` options (checked before the build is written: a typo costs no build)."""

    target: str
    parties: tuple[str, ...]  # the folders to write
    expose: str
    agreed: dict[str, PeerAddress] | None
    addresses: str | None  # the file, for messages
    image: str | None


def deploy_options(
    program: Program,
    target: str,
    *,
    party: str | None = None,
    expose: str | None = None,
    addresses: str | Path | None = None,
    image: str | None = None,
) -> DeployOptions:
    """Check the options against the pipeline; raises DeployError naming the flag (and a suggestion)."""
    if target not in TARGETS:
        raise DeployError(f"--target {target}: unknown target (use kubernetes or compose)")
    if expose is not None and target != "kubernetes":
        raise DeployError(f"--expose {expose}: only for --target kubernetes (compose publishes ports)")
    expose = expose or "clusterip"
    if expose not in EXPOSE:
        raise DeployError(f"--expose {expose}: use {', '.join(EXPOSE)}")
    names = [p.name for p in program.parties]
    if party is not None and party not in names:
        best = did_you_mean(party, names)
        raise DeployError(f"--party {party}: no such party in pipeline {program.pipeline}",
                          f"did you mean `{best}`?" if best else f"parties: {', '.join(names)}")
    if image is not None and (not image.strip() or any(c.isspace() for c in image)):
        raise DeployError(f"--image {image!r}: not an image reference such as registry.example/fldsl:0.1.0")
    _services(program)  # two nodes that map to one DNS name are refused here
    agreed = load_agreed_addresses(Path(addresses), program) if addresses is not None else None
    chosen = (party,) if party is not None else tuple(names)
    for name in chosen:
        own = [n for n in program.nodes if n.party == name]
        if agreed is not None:
            talks_to = {p.id for n in own for p in lower.peers_of(program, n) if p.party != name}
            missing = sorted(talks_to - set(agreed))
            if missing:
                raise DeployError(f"--addresses {addresses}: no entry for {', '.join(missing)}, which party "
                                  f"{name}'s nodes talk to", "every node of the other parties that this "
                                  "party's nodes talk to needs its host, port and bootstrap_port")
        if agreed is not None and expose == "nodeport":  # the ports the other parties dial are NodePorts
            for n in own:
                a = agreed.get(n.id)
                for what, port in (("secure", a.port), ("bootstrap", a.bootstrap_port)) if a else ():
                    if port not in NODEPORTS:
                        raise DeployError(
                            f"--expose nodeport: {n.id}'s {what} port {port} in --addresses is outside the "
                            f"NodePort range {NODEPORTS.start}-{NODEPORTS.stop - 1}",
                            "give its entry ports in that range, or use --expose loadbalancer")
    return DeployOptions(target, chosen, expose, agreed, None if addresses is None else str(addresses), image)


def write_deploy(program: Program, build_dir: Path, options: DeployOptions, *, digest: str) -> DeployResult:
    """Write ``deploy/<target>/<party>/`` for each of ``options.parties``."""
    services = _services(program)
    written: list[str] = []
    notes: list[str] = []
    dcap = program.trust.attestation == "dcap"
    for name in options.parties:
        rel = f"deploy/{options.target}/{name}"
        default = (f"fldsl-{service_name(program.pipeline)}-{service_name(name)}:{short_digest(digest)}"
                   if dcap and options.target == "kubernetes" else SGX_IMAGE if dcap else IMAGE)
        d = Party(program=program, name=name, digest=digest, target=options.target, expose=options.expose,
                  image=options.image or default, agreed=options.agreed, build_dir=build_dir,
                  out=build_dir / rel, services=services)
        files = kubernetes_party(d) if options.target == "kubernetes" else compose_party(d)
        if d.out.exists():  # only what this compile wrote: no file of an earlier layout lingers
            shutil.rmtree(d.out)
        d.out.mkdir(parents=True)
        for fname, text in sorted(files.items()):
            (d.out / fname).write_text(text, encoding="utf-8")
            written.append(f"{rel}/{fname}")
        notes += d.notes
    return DeployResult(sorted(written), notes)
