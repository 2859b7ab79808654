"""``fldsl compile --target compose|kubernetes``: deployment files beside the build (DESIGN §7).

Written under ``build/<pipeline>/deploy/`` after the node artifacts; they are not part of any node's
measurement nor of the pipeline digest (where a node runs is not a security property: peers are
identified by attestation). Every node gets one container from one image (default ``fldsl:latest``, which
must contain the fldsl package and, for ``attestation dcap``, Gramine) with:

- its node folder at ``/fldsl/node`` (read-only) and, for the sim runtime, at ``/fldsl/build/nodes/<id>``,
- ``addresses.json`` at ``/fldsl/run/addresses.json`` (service name, port 7443, bootstrap port 7444),
- a volume for ``/fldsl/sealed`` (checkpoints and the exported model, sealed),
- the folders of its CSV files mounted read-only: an absolute path at the same path; a relative one
  (declared with a schema block, resolved by the node against its working folder) from the folder it names
  relative to where ``fldsl compile`` ran, at that folder relative to the container's working folder.

``attestation sim`` runs ``python3 -m fldsl.runtime.node`` with its party's simulated trust folder, and only
that one, mounted at ``/fldsl/trust`` (``fldsl trust init --party P`` makes ``.fldsl/trust/P``; Kubernetes:
the Secret ``<pipeline>-trust-<party>``); ``attestation dcap`` runs ``gramine-sgx node/<node>``
in the working folder the signed manifest expects (``/fldsl/work``: ``node/``, ``run/``, ``pycache/``;
see fldsl.runtime.enclave_runner) with the SGX devices (compose) or ``sgx.intel.com/epc`` resources
(Kubernetes, Intel SGX device plugin) and the host's AESM socket (``/var/run/aesmd``: without it no quote
can be made), which needs the build signed on the deployment host (``fldsl compile --sign``).

YAML is written by hand (deterministic, no extra dependency); every string is a JSON string, which is a
valid YAML double-quoted scalar.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from fldsl.compiler import lower
from fldsl.compiler.ir import Program

from fldsl.artifacts import dump_json

PORT = 7443
BOOTSTRAP_PORT = 7444
IMAGE = "fldsl:latest"


class DeployError(Exception):
    """Deployment files cannot be generated (message is user-facing)."""


def service_name(node_id: str) -> str:
    """A DNS-1123 label for a node id: ``bank1.worker`` -> ``bank1-worker``."""
    name = re.sub(r"[^a-z0-9-]", "-", node_id.lower()).strip("-")
    return name[:63].rstrip("-") or "node"


def _services(program: Program) -> dict[str, str]:
    names: dict[str, str] = {}
    for n in program.nodes:
        s = service_name(n.id)
        if s in names.values():
            other = next(k for k, v in names.items() if v == s)
            raise DeployError(f"nodes `{other}` and `{n.id}` map to the same service name `{s}`; rename one")
        names[n.id] = s
    return names


def _data_mounts(program: Program, node_id: str, workdir: str) -> list[tuple[str, str]]:
    """(host folder, container folder) of each folder holding the node's CSV files."""
    node = program.node(node_id)
    mounts: set[tuple[str, str]] = set()
    for d in program.datasets:
        if d.party != node.party or d.spec.name not in node.data or not d.spec.path:
            continue
        folder = str(Path(d.spec.path).parent)
        if Path(folder).is_absolute():
            mounts.add((folder, folder))
        else:  # the node opens it relative to its working folder, so that is where the container needs it
            mounts.add((os.path.abspath(folder), posixpath.normpath(posixpath.join(workdir, folder))))
    return sorted(mounts)


WORK = "/fldsl/work"  # the enclave's working folder (relative URIs in the signed manifest)
AESM = "/var/run/aesmd"  # the AESM service's socket folder: gramine-sgx asks it for quotes


def _command(program: Program, node_id: str) -> list[str]:
    if program.trust.attestation == "dcap":
        return ["gramine-sgx", f"node/{node_id.split('.', 1)[1]}"]
    return [
        "python3",
        "-m",
        "fldsl.runtime.node",
        "--build",
        "/fldsl/build",
        "--node",
        node_id,
        "--addresses",
        "/fldsl/run/addresses.json",
        "--run-dir",
        "/fldsl/sealed",
        "--trust-dir",
        "/fldsl/trust",
        "--attestation",
        "sim",
    ]


def _y(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def compose_file(program: Program, services: dict[str, str]) -> str:
    lines = [f"# fldsl {program.pipeline}: one service per node (docker compose up).", "services:"]
    for n in program.nodes:
        s = services[n.id]
        dcap = program.trust.attestation == "dcap"
        lines += [
            f"  {s}:",
            f"    image: {_y(IMAGE)}",
            f"    hostname: {_y(s)}",
            f"    working_dir: {_y(WORK if dcap else '/fldsl/node')}",
            f"    command: {_y(_command(program, n.id))}",
            "    environment:",
            f"      FLDSL_NODE: {_y(n.id)}",
            "    volumes:",
        ]
        if dcap:
            lines += [
                f"      - {_y(f'../../nodes/{n.id}:{WORK}/node:ro')}",
                f"      - {_y(f'../../pycache:{WORK}/pycache:ro')}",
                f"      - {_y(f'sealed-{s}:{WORK}/run')}",
                f"      - {_y(f'../addresses.json:{WORK}/run/addresses.json:ro')}",
                f"      - {_y(f'{AESM}:{AESM}')}",
            ]
        else:
            lines += [
                f"      - {_y(f'../../nodes/{n.id}:/fldsl/node:ro')}",
                f"      - {_y(f'../../nodes/{n.id}:/fldsl/build/nodes/{n.id}:ro')}",
                f"      - {_y('../addresses.json:/fldsl/run/addresses.json:ro')}",
                f"      - {_y(f'sealed-{s}:/fldsl/sealed')}",
            ]
        if program.trust.attestation == "sim":
            party = n.id.split(".", 1)[0]  # its own party's folder: never another party's secrets
            mount = "${FLDSL_TRUST_DIR:-../../../../.fldsl/trust}/" + party + ":/fldsl/trust:ro"
            lines.append(f"      - {_y(mount)}")
        workdir = WORK if dcap else "/fldsl/node"
        lines += [f"      - {_y(f'{h}:{c}:ro')}" for h, c in _data_mounts(program, n.id, workdir)]
        if program.trust.attestation == "dcap":
            lines += [
                "    devices:",
                f"      - {_y('/dev/sgx_enclave')}",
                f"      - {_y('/dev/sgx_provision')}",
            ]
        peers = [p.id for p in lower.peers_of(program, n) if p.dial]
        if peers:
            lines.append("    depends_on:")
            lines += [f"      - {_y(services[p])}" for p in peers]
        lines.append(f"    expose: [{PORT}, {BOOTSTRAP_PORT}]")
    lines.append("volumes:")
    lines += [f"  sealed-{services[n.id]}: {{}}" for n in program.nodes]
    return "\n".join(lines) + "\n"


def _trust_secret(program: Program, node_id: str) -> str:
    """One Secret per party: a party's pods mount its own trust folder and no other party's."""
    return f"{program.pipeline}-trust-{node_id.split('.', 1)[0]}".replace("_", "-").lower()


def kubernetes_file(program: Program, node_id: str, services: dict[str, str]) -> str:
    s = services[node_id]
    dcap = program.trust.attestation == "dcap"
    labels = {"app.kubernetes.io/part-of": program.pipeline, "fldsl/node": node_id}
    if dcap:  # the signed manifest's working folder (see the module docstring)
        vol_mounts = [
            {"name": "node", "mountPath": f"{WORK}/node", "readOnly": True},
            {"name": "sealed", "mountPath": f"{WORK}/run"},
            {"name": "addresses", "mountPath": f"{WORK}/run/addresses.json", "subPath": "addresses.json",
             "readOnly": True},
            {"name": "aesmd", "mountPath": AESM},
        ]
    else:
        vol_mounts = [
            {"name": "node", "mountPath": "/fldsl/node", "readOnly": True},
            {"name": "node", "mountPath": f"/fldsl/build/nodes/{node_id}", "readOnly": True},
            {"name": "addresses", "mountPath": "/fldsl/run", "readOnly": True},
            {"name": "sealed", "mountPath": "/fldsl/sealed"},
        ]
    volumes: list[dict[str, Any]] = [
        {"name": "node", "configMap": {"name": f"{s}-node"}},
        {"name": "addresses", "configMap": {"name": f"{program.pipeline.replace('_', '-')}-addresses"}},
        {"name": "sealed", "persistentVolumeClaim": {"claimName": f"{s}-sealed"}},
    ]
    if dcap:
        volumes.append({"name": "aesmd", "hostPath": {"path": AESM, "type": "Directory"}})
    if not dcap:
        vol_mounts.append({"name": "trust", "mountPath": "/fldsl/trust", "readOnly": True})
        volumes.append(
            {"name": "trust", "secret": {"secretName": _trust_secret(program, node_id)}}
        )
    for i, (host, inside) in enumerate(_data_mounts(program, node_id, WORK if dcap else "/fldsl/node")):
        vol_mounts.append({"name": f"data{i}", "mountPath": inside, "readOnly": True})
        volumes.append({"name": f"data{i}", "hostPath": {"path": host, "type": "Directory"}})
    resources = {"limits": {"sgx.intel.com/epc": program.trust.enclave_size}} if dcap else {}
    container = {
        "name": "node",
        "image": IMAGE,
        "workingDir": WORK if dcap else "/fldsl/node",
        "command": _command(program, node_id),
        "ports": [
            {"containerPort": PORT, "name": "secure"},
            {"containerPort": BOOTSTRAP_PORT, "name": "bootstrap"},
        ],
        "volumeMounts": vol_mounts,
        "resources": resources,
    }
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": s, "labels": labels},
            "spec": {
                "selector": {"fldsl/service": s},
                "ports": [{"name": "secure", "port": PORT}, {"name": "bootstrap", "port": BOOTSTRAP_PORT}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{s}-sealed", "labels": labels},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": s, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"fldsl/service": s}},
                "template": {
                    "metadata": {"labels": {"fldsl/service": s, **labels}},
                    "spec": {"containers": [container], "volumes": volumes},
                },
            },
        },
    ]
    header = (
        f"# fldsl {program.pipeline}, node {node_id}. Create the ConfigMap `{s}-node` from\n"
        f"# nodes/{node_id}/ (kubectl create configmap {s}-node --from-file=../../nodes/{node_id}/).\n"
    )
    return header + "---\n".join(_yaml(d) for d in docs)


def _yaml(v: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts/lists of scalars (scalars as JSON)."""
    pad = "  " * indent
    if isinstance(v, dict):
        if not v:
            return "{}\n"
        out = []
        for k, x in v.items():
            if isinstance(x, dict | list) and x:
                out.append(f"{pad}{_key(k)}:\n{_yaml(x, indent + 1)}")
            else:
                out.append(f"{pad}{_key(k)}: {_scalar(x)}\n")
        return "".join(out)
    if isinstance(v, list):
        out = []
        for x in v:
            if isinstance(x, dict) and x:
                body = _yaml(x, indent + 1)
                first, _, rest = body.partition("\n")
                out.append(f"{pad}- {first.strip()}\n{rest}")
            else:
                out.append(f"{pad}- {_scalar(x)}\n")
        return "".join(out)
    return f"{pad}{_scalar(v)}\n"


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_./-]+", k) else json.dumps(k)


def _scalar(x: Any) -> str:
    if isinstance(x, dict):
        return "{}"
    if isinstance(x, list):
        return json.dumps(x)
    return json.dumps(x, ensure_ascii=False)


def write_deploy(program: Program, build_dir: Path, target: str) -> list[str]:
    """Write ``deploy/addresses.json`` and the target's files; returns their paths relative to build_dir."""
    services = _services(program)
    out = build_dir / "deploy"
    written: list[str] = []

    def write(rel: str, text: str) -> None:
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        written.append(f"deploy/{rel}")

    addresses = {
        nid: {"host": s, "port": PORT, "bootstrap_port": BOOTSTRAP_PORT}
        for nid, s in sorted(services.items())
    }
    write("addresses.json", dump_json(addresses))
    if target == "compose":
        write("compose/docker-compose.yml", compose_file(program, services))
    elif target == "kubernetes":
        for n in program.nodes:
            write(f"kubernetes/{services[n.id]}.yaml", kubernetes_file(program, n.id, services))
    else:
        raise DeployError(f"unknown target `{target}` (use kubernetes or compose)")
    return sorted(written)
