"""``--target compose``: a party's compose.yaml (one service per node) and its addresses.json."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

from fldsl.artifacts import dump_json
from fldsl.compiler.deploy_party import (
    AESM,
    BOOTSTRAP_PORT,
    CPU_LIMIT,
    GID,
    PORT,
    RESTARTS,
    UID,
    WORK,
    DeployError,
    Party,
    _comment,
    _cross_party,
    _data_mounts,
    _env,
    _global_ports,
    _header,
    _node_command,
    addresses_for,
    memory_mib,
)
from fldsl.compiler.ir import IRNode
from fldsl.compiler.yaml_text import _yaml

# ---------------------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------------------


def compose_party(d: Party) -> dict[str, str]:
    """{file name: text} of the party's compose project."""
    rel_build = posixpath.relpath(d.build_dir.resolve().as_posix(), d.out.resolve().as_posix())
    trust_root = posixpath.relpath((Path.cwd() / ".fldsl" / "trust").resolve().as_posix(),
                                   d.out.resolve().as_posix())
    services: dict[str, Any] = {}
    own = {n.id for n in d.nodes()}
    agreed = d.agreed or {}
    for n in d.nodes():
        s = d.services[n.id]
        workdir = WORK if d.dcap else "/fldsl/node"
        volumes = _volumes(d, n, s, workdir, rel_build, trust_root)
        request, limit = memory_mib(d.program, n)
        svc: dict[str, Any] = {
            "image": d.image,
            "hostname": s,
            # The user that owns the trust folder (its keys are 0600), in the image's group, which owns the
            # sealed volume: FLDSL_UID=$(id -u) docker compose up -d
            "user": "${FLDSL_UID:-" + str(UID) + "}:" + str(GID),
            "read_only": True,
            "tmpfs": ["/tmp"],
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            # A crash restarts the node, which resumes from its checkpoint; a finished node stays finished.
            "restart": f"on-failure:{RESTARTS}",
            "stop_grace_period": "60s",
            "working_dir": workdir,
            "command": _node_command(d, n, None),
            "environment": _env(),
            "mem_reservation": f"{request}m",
            "mem_limit": f"{limit}m",
            "cpus": CPU_LIMIT,
            "healthcheck": {
                "test": ["CMD", "python3", "-I", "-c", "import socket; socket.create_connection("
                         f"('127.0.0.1', {BOOTSTRAP_PORT}), 5).close()"],
                "interval": "30s", "timeout": "10s", "retries": 4, "start_period": "10m",
            },
            "volumes": volumes,
        }
        if d.dcap:
            svc["devices"] = ["/dev/sgx_enclave", "/dev/sgx_provision"]
        if _cross_party(d, n):  # published for the other parties' nodes
            a = agreed.get(n.id)
            port, boot = (a.port, a.bootstrap_port) if a is not None else _global_ports(d.program, n.id)
            svc["ports"] = [f"{port}:{PORT}", f"{boot}:{BOOTSTRAP_PORT}"]
            if d.agreed is None:  # the other parties' projects on this host, at their published ports
                svc["extra_hosts"] = ["host.docker.internal:host-gateway"]
        dials = [pid for pid, _, dial in d.peers(n) if dial and pid in own]
        if dials:
            svc["depends_on"] = [d.services[p] for p in dials]
        services[s] = svc
    doc = {
        "name": d.project(),
        "services": services,
        "volumes": {f"sealed-{d.services[n.id]}": {"name": d.obj(n.id, "-sealed")} for n in d.nodes()},
    }
    peers_note = ("the other parties' nodes where --addresses put them" if d.agreed is not None else
                  "the other parties' projects on this docker host (host.docker.internal)")
    head = _comment([
        *_header(d, "its compose project"),
        "",
        "From this folder, as the user that owns the party's trust folder (.fldsl/trust/" + d.name + "):",
        "  FLDSL_UID=$(id -u) docker compose up -d",
        "Published ports are for the other parties' nodes; addresses.json holds this party's nodes",
        f"(listening on 0.0.0.0) and {peers_note}.",
    ])
    return {"compose.yaml": head + _yaml(doc), "addresses.json": dump_json(addresses_for(d))}


def _volumes(d: Party, n: IRNode, s: str, workdir: str, rel_build: str, trust_root: str) -> list[str]:
    """Node ``n``'s volumes (service ``s``): its folder, addresses, sealed volume, trust folder or SGX
    socket, and its data."""
    if d.dcap:
        volumes = [
            f"{rel_build}/nodes/{n.id}:{WORK}/node:ro",
            f"{rel_build}/pycache:{WORK}/pycache:ro",
            f"sealed-{s}:{WORK}/run",
            f"./addresses.json:{WORK}/run/addresses.json:ro",
            f"{AESM}:{AESM}",
        ]
        folders = _data_mounts(d.program, n.id, workdir)
        if len(folders) > 1:
            raise DeployError(f"{n.id} reads csv files from {len(folders)} folders; inside the enclave "
                              "they are one encrypted folder (data/): put them in one")
        volumes += [f"{host}:{WORK}/data:ro" for host, _ in folders]
    else:
        volumes = [
            f"{rel_build}/nodes/{n.id}:/fldsl/node:ro",
            "./addresses.json:/fldsl/run/addresses.json:ro",
            f"sealed-{s}:/fldsl/sealed",
            # Its own party's folder, and only that one (override the root with FLDSL_TRUST_DIR).
            "${FLDSL_TRUST_DIR:-" + trust_root + "}/" + d.name + ":/fldsl/trust:ro",
        ]
        volumes += [f"{host}:{inside}:ro" for host, inside in _data_mounts(d.program, n.id, workdir)]
    return volumes
