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

import ipaddress
import json
import math
import os
import posixpath
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fldsl import __version__
from fldsl.artifacts import FILE_READERS, dump_json
from fldsl.compiler import lower
from fldsl.compiler.ir import IRNode, Program
from fldsl.compiler.manifest import ManifestInputs
from fldsl.diagnostics import did_you_mean

TARGETS = ("kubernetes", "compose")
EXPOSE = ("clusterip", "nodeport", "loadbalancer")
PORT = 7443  # mutual-TLS gRPC inside the container
BOOTSTRAP_PORT = 7444  # RA-TLS certificate exchange; the node listens only once it has attested
SHORT_DIGEST = 12
UID = GID = 10001  # the image's non-root user (Dockerfile)
IMAGE = f"fldsl:{__version__}"
SGX_IMAGE = f"fldsl:{__version__}-sgx"
NODEPORTS = range(30000, 32768)  # Kubernetes' default --service-node-port-range
WORK = "/fldsl/work"  # compose + dcap: the enclave's working folder (relative URIs in the signed manifest)
AESM = "/var/run/aesmd"  # the AESM service's socket folder: gramine-sgx asks it for quotes
DATA = "/fldsl/data"  # Kubernetes + sim: the party's data volume (csv files by name)

# The signed manifest fixes these for dcap nodes (fldsl.compiler.manifest); a sim node in a container gets the
# same, so both runtimes wait alike for a party that deploys later and size their thread pools alike.
_MANIFEST = ManifestInputs.model_fields
CONNECT_TIMEOUT_S: int = _MANIFEST["connect_timeout_s"].default
INTRA_OP_THREADS: int = _MANIFEST["intra_op_threads"].default
INTER_OP_THREADS: int = _MANIFEST["inter_op_threads"].default

# Memory. The e2e tests bound a node's peak resident memory at 1.3 GB (tests/e2e/test_peer_abuse.py,
# PEAK_LIMIT_KB, in KiB): TensorFlow and gRPC take ~0.6 GB of it, the rest is training a shipped pipeline
# with one link's receive budget full (a peer flooding it). A node also holds, at most, the receive budgets
# of its other links (fldsl.runtime.transport.link.receive_budget: what peers can make it buffer before it
# refuses them) and the model's state: 16 bytes a parameter (float32 weights, gradient, two Adam slots; the
# whole model, an upper bound for a node that holds part of it). The request is that sum, so the scheduler
# places a node where its measured peak fits; the limit adds 512 MiB of headroom, because an OOM kill costs a
# restart from the last checkpoint.
MEASURED_PEAK_KIB = 1_300_000
STATE_BYTES_PER_PARAM = 16
MEMORY_HEADROOM_MIB = 512
# CPU: TensorFlow's two pools (intra- and inter-op threads, as the manifest fixes them) compute at once; gRPC
# and the bootstrap server run beside them. A CPU limit only throttles, so it is set above the request.
CPU_REQUEST = str(INTRA_OP_THREADS)
CPU_LIMIT = str(INTRA_OP_THREADS + INTER_OP_THREADS)
# Checkpoints hold the weights and the optimizer state (~12 bytes a parameter) and are retained a few at a
# time; the shipped models are a few MB. 1 GiB covers models up to ~20 M parameters.
SEALED_STORAGE = "1Gi"
# Restarts before a node counts as failed (a Job's backoffLimit; compose: on-failure:N). A crash resumes from
# the checkpoint; a trust or input refusal (exit 3 or 2) fails the same way every time, so the count is small.
RESTARTS = 5
_NAME_OK = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


class DeployError(Exception):
    """Deployment files cannot be generated (message is user-facing; ``hint`` becomes ``help: ...``)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def service_name(node_id: str) -> str:
    """A DNS-1123 label for a node id or party: ``bank1.worker`` -> ``bank1-worker``."""
    name = re.sub(r"[^a-z0-9-]", "-", node_id.lower()).strip("-")
    return name[:63].rstrip("-") or "node"


def short_digest(digest: str) -> str:
    return digest[:SHORT_DIGEST]


# ---------------------------------------------------------------------------------------------------------
# options and the agreed addresses file
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerAddress:
    """Where another party's node is reached, from ``--addresses``; ``egress`` (CIDRs) is where its
    connections come from, for a NetworkPolicy: ``egress_cidrs`` in the file, else the host when it is an
    IP address, else unknown (a NetworkPolicy cannot admit a host name)."""

    host: str
    port: int
    bootstrap_port: int
    key_service: str | None = None
    egress: tuple[str, ...] = ()


def load_agreed_addresses(path: Path, program: Program) -> dict[str, PeerAddress]:
    """The addresses file the parties agreed on: the runtime format (``{node: {host, port, bootstrap_port,
    key_service?}}``) plus, per node, optional ``egress_cidrs``. Node ids must be the pipeline's."""
    from fldsl.runtime.transport.addresses import Addresses  # (imports gRPC: only when a file is given)

    try:
        raw = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise DeployError(f"--addresses {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DeployError(f"--addresses {path}: not a JSON file: {e}") from None
    if not isinstance(raw, dict):
        raise DeployError(f"--addresses {path}: expected {{node id: {{host, port, bootstrap_port}}}}")
    known = [n.id for n in program.nodes]
    egress: dict[str, tuple[str, ...]] = {}
    for nid, entry in raw.items():
        if nid not in known:
            best = did_you_mean(nid, known)
            raise DeployError(f"--addresses {path}: no node `{nid}` in pipeline {program.pipeline}",
                              f"did you mean `{best}`?" if best else f"nodes: {', '.join(sorted(known))}")
        if isinstance(entry, dict) and "egress_cidrs" in entry:
            egress[nid] = _cidrs(entry.pop("egress_cidrs"), f"--addresses {path}: {nid}: egress_cidrs")
    try:
        addrs = Addresses.model_validate(raw)
    except ValueError as e:
        raise DeployError(f"--addresses {path}: not a valid addresses file: {e}") from None
    out: dict[str, PeerAddress] = {}
    for nid, a in addrs.root.items():
        if a.port == 0 or a.bootstrap_port == 0:
            raise DeployError(f"--addresses {path}: {nid}: port 0 (a free one) only works on one machine")
        cidr = _ip_cidr(a.host)
        auto: tuple[str, ...] = (cidr,) if cidr else ()
        out[nid] = PeerAddress(a.host, a.port, a.bootstrap_port, a.key_service, egress.get(nid, auto))
    return out


def _cidrs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DeployError(f"{where}: expected a list of CIDRs such as [\"203.0.113.0/24\"]")
    try:
        return tuple(str(ipaddress.ip_network(v, strict=False)) for v in value)
    except ValueError as e:
        raise DeployError(f"{where}: {e}") from None


def _ip_cidr(host: str) -> str | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return f"{ip}/{ip.max_prefixlen}"


@dataclass
class Party:
    """Everything one party's folder is generated from."""

    program: Program
    name: str
    digest: str
    target: str
    expose: str
    image: str
    agreed: dict[str, PeerAddress] | None  # --addresses, or None: every party in one cluster / on one host
    build_dir: Path
    out: Path  # deploy/<target>/<party>/
    services: dict[str, str]  # node id -> DNS label
    notes: list[str] = field(default_factory=list)

    @property
    def dcap(self) -> bool:
        return self.program.trust.attestation == "dcap"

    @property
    def d12(self) -> str:
        return short_digest(self.digest)

    @property
    def pipe(self) -> str:
        name = service_name(self.program.pipeline)
        return name if name[0].isalpha() else f"fldsl-{name}"

    def nodes(self) -> list[IRNode]:
        return sorted((n for n in self.program.nodes if n.party == self.name), key=lambda n: n.id)

    def peers(self, node: IRNode) -> list[tuple[str, str, bool]]:
        """(peer id, its party, whether ``node`` dials it)."""
        return [(p.id, p.party, p.dial) for p in lower.peers_of(self.program, node)]

    def peer_parties(self) -> list[str]:
        return sorted({party for n in self.nodes() for _, party, _ in self.peers(n)} - {self.name})

    # names: every object of a node carries the pipeline and the short digest
    def fit(self, rest: str) -> str:
        """``<pipeline>-<rest>``, the pipeline part shortened so that the name is a DNS label (≤ 63)."""
        room = 63 - len(rest) - 1
        if room < 1:
            raise DeployError(f"the name `{rest}` leaves no room for the pipeline in a 63-character "
                              "Kubernetes name; shorten the party or node name")
        name = f"{self.pipe[:room].rstrip('-')}-{rest}"
        if not _NAME_OK.fullmatch(name):  # a DNS-1035 label: Services need one
            raise DeployError(f"`{name}` is not a Kubernetes name (a letter, then letters, digits, '-')")
        return name

    def obj(self, node_id: str, suffix: str = "") -> str:
        return self.fit(f"{self.d12}-{self.services[node_id]}{suffix}")

    def namespace(self, party: str | None = None) -> str:
        return self.fit(service_name(party or self.name))

    def secret(self) -> str:
        return self.fit(f"trust-{service_name(self.name)}")

    def project(self) -> str:
        return self.fit(f"{self.d12}-{service_name(self.name)}")


def _global_ports(program: Program, node_id: str) -> tuple[int, int]:
    """Compose without --addresses: the host ports every party's compile gives a node, distinct across the
    pipeline so that all parties can share one docker host for a trial."""
    i = sorted(n.id for n in program.nodes).index(node_id)
    return PORT + 2 * i, BOOTSTRAP_PORT + 2 * i


def addresses_for(d: Party) -> dict[str, dict[str, Any]]:
    """The party's addresses.json: its own nodes as its containers reach them (listening on 0.0.0.0), and
    the other parties' nodes it talks to where the agreed file (or the default layout) puts them."""
    out: dict[str, dict[str, Any]] = {}
    own = {n.id for n in d.nodes()}
    for n in d.nodes():
        entry: dict[str, Any] = {
            "host": d.obj(n.id) if d.target == "kubernetes" else d.services[n.id],
            "port": PORT, "bootstrap_port": BOOTSTRAP_PORT,
            "listen": "0.0.0.0",  # in a container, loopback is unreachable from the peers
        }
        agreed = (d.agreed or {}).get(n.id)
        if agreed is not None and agreed.key_service:
            entry["key_service"] = agreed.key_service
        out[n.id] = entry
    for n in d.nodes():
        for pid, party, _ in d.peers(n):
            if pid in own or pid in out:
                continue
            if d.agreed is not None:
                a = d.agreed[pid]
                out[pid] = {"host": a.host, "port": a.port, "bootstrap_port": a.bootstrap_port}
            elif d.target == "kubernetes":  # every party in one cluster: the other namespace's Service
                out[pid] = {"host": f"{d.obj(pid)}.{d.namespace(party)}.svc", "port": PORT,
                            "bootstrap_port": BOOTSTRAP_PORT}
            else:  # every party on one docker host: the other project's published ports
                port, boot = _global_ports(d.program, pid)
                out[pid] = {"host": "host.docker.internal", "port": port, "bootstrap_port": boot}
    return dict(sorted(out.items()))


def _cross_party(d: Party, node: IRNode) -> bool:
    return any(party != d.name for _, party, _ in d.peers(node))


def _csv_data(program: Program, node: IRNode) -> list[tuple[str, str]]:
    """(data set name, path) of the node's data files (csv or Parquet)."""
    return sorted((ds.spec.name, ds.spec.path) for ds in program.datasets
                  if ds.party == node.party and ds.spec.name in node.data and ds.spec.reader in FILE_READERS
                  and ds.spec.path)


def _data_mounts(program: Program, node_id: str, workdir: str) -> list[tuple[str, str]]:
    """(host folder, container folder) of each folder holding the node's CSV files (compose + sim)."""
    mounts: set[tuple[str, str]] = set()
    for _, path in _csv_data(program, program.node(node_id)):
        folder = str(Path(path).parent)
        if Path(folder).is_absolute():
            mounts.add((folder, folder))
        else:  # the node opens it relative to its working folder, so that is where the container needs it
            mounts.add((os.path.abspath(folder), posixpath.normpath(posixpath.join(workdir, folder))))
    return sorted(mounts)


def _data_bindings(program: Program, node: IRNode, root: str) -> list[str]:
    """``--data NAME=<root>/<file name>``: the party's data volume holds the files by name."""
    seen: dict[str, str] = {}
    out = []
    for name, path in _csv_data(program, node):
        base = posixpath.basename(path)
        if base in seen:
            raise DeployError(f"{node.id}: data sets `{seen[base]}` and `{name}` are both files named "
                              f"`{base}`; the data volume holds them by name, so rename one")
        seen[base] = name
        out.append(f"--data={name}={root}/{base}")
    return out


def memory_mib(program: Program, node: IRNode) -> tuple[int, int]:
    """(request, limit) in MiB; see MEASURED_PEAK_KIB."""
    from fldsl.runtime.transport.link import receive_budget

    peers = [p.id for p in lower.peers_of(program, node)]
    budgets = sorted((receive_budget(program.flows, p, node.id) for p in peers), reverse=True)
    state = STATE_BYTES_PER_PARAM * sum(program.param_counts.values())
    need = MEASURED_PEAK_KIB * 1024 + sum(budgets[1:]) + state  # the first link's budget is in the peak
    request = math.ceil(need / (64 << 20)) * 64
    return request, request + MEMORY_HEADROOM_MIB


def _enclave_quantity(size: str) -> str:
    """Gramine's "16G" is 16 GiB; a Kubernetes "16G" would be 16·10⁹ bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]?)", size.strip().upper())
    if not m:
        raise DeployError(f"enclave_size `{size}` is not a size such as \"8G\"")
    return f"{m.group(1)}{m.group(2)}i" if m.group(2) else m.group(1)


def _node_command(d: Party, node: IRNode, data_root: str | None) -> list[str]:
    if d.dcap:
        return ["gramine-sgx", f"node/{node.id.split('.', 1)[1]}"]
    cmd = ["python3", "-I", "-m", "fldsl.runtime.node", "--node-dir", "/fldsl/node", "--node", node.id,
           "--addresses", "/fldsl/run/addresses.json", "--run-dir", "/fldsl/sealed",
           "--trust-dir", "/fldsl/trust", "--attestation", "sim",
           "--connect-timeout", str(CONNECT_TIMEOUT_S)]
    if data_root is not None:
        cmd += _data_bindings(d.program, node, data_root)
    return cmd


def _env() -> dict[str, str]:
    return {
        # Python's isolated mode (-I) ignores PYTHON* variables; these reach TensorFlow and fldsl.
        "HOME": "/tmp",
        "OMP_NUM_THREADS": str(INTRA_OP_THREADS),
        "TF_NUM_INTRAOP_THREADS": str(INTRA_OP_THREADS),
        "TF_NUM_INTEROP_THREADS": str(INTER_OP_THREADS),
        "FLDSL_MAX_WORKER_THREADS": str(INTRA_OP_THREADS),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0",
    }


def _header(d: Party, what: str) -> list[str]:
    base = SGX_IMAGE if d.dcap else IMAGE
    return [
        f"fldsl {__version__}: pipeline {d.program.pipeline}, party {d.name}: {what}.",
        f"Generated by `fldsl compile PIPELINE.flp --target {d.target} --party {d.name}`; recompile, do not "
        "edit.",
        f"Pipeline digest {d.digest}:",
        f"every party's compile must print it. Its first 12 digits ({d.d12}) are in every name, so a",
        "recompiled pipeline never reuses these volumes. This folder holds no secret and nothing of the",
        "other parties.",
        f"Image: `docker build {'--target sgx ' if d.dcap else ''}-t {base} .` at the root of the fldsl "
        "source that compiled",
        f"this pipeline (docs/deploy.md); {_runs(d, base)}.",
    ]


def _runs(d: Party, base: str) -> str:
    if d.dcap and d.target == "kubernetes":
        return f"nodes run {d.image}:\nnode-image.Dockerfile, the signed build on top of {base}"
    if d.image != base:
        return f"nodes run {d.image} (that image, pushed where the nodes pull from)"
    return f"nodes run {d.image}"


def _comment(lines: list[str]) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for text in lines for line in text.split("\n"))


# ---------------------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------------------


def _labels(d: Party, node_id: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "fldsl",
        "app.kubernetes.io/part-of": d.pipe,
        "app.kubernetes.io/version": re.sub(r"[^A-Za-z0-9_.-]", "-", __version__),
        "fldsl/pipeline": d.pipe,
        "fldsl/digest": d.d12,
        "fldsl/party": service_name(d.name),
    }
    if node_id is not None:
        labels["fldsl/node"] = d.services[node_id]
    return labels


def _selector(d: Party, node_id: str) -> dict[str, str]:
    """The pods of one node of this digest (a Service or NetworkPolicy never selects another digest's)."""
    return {"fldsl/pipeline": d.pipe, "fldsl/digest": d.d12, "fldsl/node": d.services[node_id]}


def _meta(d: Party, name: str, node_id: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": d.namespace(), "labels": _labels(d, node_id), **extra}


def _trust_items(d: Party) -> list[dict[str, str]]:
    """Secret keys -> files of the party's trust folder. A Secret key cannot hold '/', so the pinned peers
    are keys ``peers.<party>.json`` placed at ``peers/<party>.json``; only the peers this party talks to."""
    from fldsl.runtime.attestation.parties import IDENTITY_FILE, PEERS_DIR
    from fldsl.runtime.attestation.sim import FILES

    names = sorted([*FILES.values(), IDENTITY_FILE])
    items = [{"key": n, "path": n} for n in names]
    items += [{"key": f"{PEERS_DIR}.{p}.json", "path": f"{PEERS_DIR}/{p}.json"} for p in d.peer_parties()]
    return items


def secret_command(d: Party, trust_root: str = ".fldsl/trust") -> str:
    """The command that makes the party's Secret from its own trust folder (and nothing else)."""
    folder = f"{trust_root}/{d.name}"
    parts = [f"kubectl create secret generic {d.secret()} -n {d.namespace()}", f"--from-file={folder}/"]
    parts += [f"--from-file=peers.{p}.json={folder}/peers/{p}.json" for p in d.peer_parties()]
    return " \\\n    ".join(parts)


def _node_files(d: Party, node_id: str) -> dict[str, str]:
    """The node's build folder as ConfigMap data (every file is text; at most 1 MiB in all)."""
    folder = d.build_dir / "nodes" / node_id
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir()) if p.is_file()}
    size = sum(len(v.encode()) for v in files.values())
    if size > 1_000_000:
        raise DeployError(f"nodes/{node_id}/ holds {size:,} bytes, more than a ConfigMap can (1 MiB)")
    return files


def kubernetes_party(d: Party) -> dict[str, str]:
    """{file name: text} of the party's Kubernetes folder."""
    ns: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": d.namespace(), "labels": {**_labels(d)}},
    }
    if not d.dcap:
        # The nodes meet the "restricted" Pod Security Standard. (dcap mounts the host's AESM socket, a
        # hostPath volume, which only the "privileged" level allows: the cluster's policy decides there.)
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "restricted"
    steps = [
        "To deploy this party (docs/deploy.md), DIR being this folder (BUILD/deploy/kubernetes/"
        + d.name + "):",
        "  1. kubectl apply -f DIR/00-namespace.yaml",
    ]
    if d.dcap:
        steps += [
            "  2. (attestation dcap: no trust Secret, quotes come from the SGX hardware) build the party's",
            "     node image from the signed build (DIR/node-image.Dockerfile) and push it",
        ]
    else:
        steps += [
            f"  2. the party's trust Secret, from its own folder only (fldsl trust init --party {d.name};",
            "     the peers' identities pinned with fldsl trust add-peer), where .fldsl/ is:",
            *("       " + line for line in secret_command(d).splitlines()),
            "     (its files reach the node with mode 0440, defaultMode 288, readable through fsGroup)",
        ]
    steps += ["  3. kubectl apply --server-side -f DIR/"]
    if not d.dcap:
        steps.append("     (server-side: a node's files exceed the 256 KiB annotation of client-side apply)")
    files = {"00-namespace.yaml": _comment([*_header(d, "its Kubernetes objects"), "", *steps]) + _yaml(ns)}

    addresses = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _meta(d, d.fit(f"{d.d12}-addresses")),
        "data": {"addresses.json": dump_json(addresses_for(d))},
    }
    files["10-addresses.yaml"] = _comment([
        *_header(d, "addresses.json of its nodes"),
        "",
        "Its own nodes listen on 0.0.0.0 at their Service; the other parties' nodes are "
        + ("where --addresses put them." if d.agreed is not None else
           "their Services in the same cluster (no --addresses given)."),
    ]) + _yaml(addresses)
    for n in d.nodes():
        docs = kubernetes_node(d, n)
        files[f"20-{d.services[n.id]}.yaml"] = (
            _comment(_header(d, f"node {n.id}")) + "---\n".join(c + _yaml(doc) for c, doc in docs))
    if d.dcap:
        files["node-image.Dockerfile"] = node_image_dockerfile(d)
    return files


def kubernetes_node(d: Party, node: IRNode) -> list[tuple[str, dict[str, Any]]]:
    """(comment, object) of one node: its files, volume, Service, NetworkPolicy and Job."""
    docs: list[tuple[str, dict[str, Any]]] = []
    workdir = f"/fldsl/nodes/{node.id}" if d.dcap else "/fldsl/node"
    csv = _csv_data(d.program, node)
    if not d.dcap:
        docs.append(("", {
            "apiVersion": "v1", "kind": "ConfigMap",
            # The digest covers every file of the node's folder: the content under this name never changes.
            "metadata": _meta(d, d.obj(node.id, "-node"), node.id),
            "immutable": True,
            "data": _node_files(d, node.id),
        }))
    docs.append((_comment(["Sealed checkpoints and exported models (encrypted by the node itself)."]), {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": _meta(d, d.obj(node.id, "-sealed"), node.id),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": SEALED_STORAGE}}},
    }))
    docs.append(_service(d, node))
    docs.append(_network_policy(d, node))

    if d.dcap:
        mounts: list[dict[str, Any]] = [
            {"name": "sealed", "mountPath": f"{workdir}/run"},
            {"name": "addresses", "mountPath": f"{workdir}/run/addresses.json", "subPath": "addresses.json",
             "readOnly": True},
            {"name": "aesmd", "mountPath": AESM},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
    else:
        mounts = [
            {"name": "node", "mountPath": "/fldsl/node", "readOnly": True},
            {"name": "addresses", "mountPath": "/fldsl/run", "readOnly": True},
            {"name": "sealed", "mountPath": "/fldsl/sealed"},
            {"name": "trust", "mountPath": "/fldsl/trust", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
    volumes: list[dict[str, Any]] = [
        {"name": "addresses", "configMap": {"name": d.fit(f"{d.d12}-addresses")}},
        {"name": "sealed", "persistentVolumeClaim": {"claimName": d.obj(node.id, "-sealed")}},
        # TensorFlow and Python write temporary files; the root filesystem is read-only.
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if d.dcap:
        volumes.append({"name": "aesmd", "hostPath": {"path": AESM, "type": "Directory"}})
    else:
        volumes.append({"name": "node", "configMap": {"name": d.obj(node.id, "-node")}})
        # Only this party's folder; 0440 (root:fsGroup): the node's user reads it through its group.
        volumes.append({"name": "trust", "secret": {"secretName": d.secret(), "defaultMode": 0o440,
                                                     "items": _trust_items(d)}})
    if csv:
        # The party's own data, in a volume it provides (files by name; encrypted ones under dcap).
        mounts.append({"name": "data", "mountPath": f"{workdir}/data" if d.dcap else DATA, "readOnly": True})
        volumes.append({"name": "data", "persistentVolumeClaim": {
            "claimName": d.fit(f"{service_name(d.name)}-data"), "readOnly": True}})

    request, limit = memory_mib(d.program, node)
    resources: dict[str, Any] = {
        "requests": {"cpu": CPU_REQUEST, "memory": f"{request}Mi"},
        "limits": {"cpu": CPU_LIMIT, "memory": f"{limit}Mi"},
    }
    if d.dcap:
        # Intel's SGX device plugin: the enclave's EPC, and the device nodes /dev/sgx_enclave and
        # /dev/sgx_provision (what it mounts for these resources; no privileged container needed).
        resources["limits"].update({
            "sgx.intel.com/epc": _enclave_quantity(d.program.trust.enclave_size),
            "sgx.intel.com/enclave": 1,
            "sgx.intel.com/provision": 1,
        })
    bootstrap = {"tcpSocket": {"port": "bootstrap"}}
    container: dict[str, Any] = {
        "name": "node",
        "image": d.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": workdir,
        "command": _node_command(d, node, None if d.dcap or not csv else DATA),
        "env": [{"name": k, "value": v} for k, v in _env().items()],
        "ports": [
            {"name": "secure", "containerPort": PORT, "protocol": "TCP"},
            {"name": "bootstrap", "containerPort": BOOTSTRAP_PORT, "protocol": "TCP"},
        ],
        "resources": resources,
        # The node listens (both ports) only once it has attested, and keeps listening while it waits for its
        # peers, however long: so a TCP check can neither admit an unattested node nor kill a waiting one.
        # Startup: attestation (a minute or more inside an enclave) gets 10 minutes before liveness counts.
        "startupProbe": {**bootstrap, "periodSeconds": 10, "failureThreshold": 60},
        "readinessProbe": {**bootstrap, "periodSeconds": 10},
        "livenessProbe": {**bootstrap, "periodSeconds": 30, "timeoutSeconds": 5, "failureThreshold": 4},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        # A crash restarts the container in place; the node resumes from the checkpoint on its volume.
        "restartPolicy": "OnFailure",
        "automountServiceAccountToken": False,  # a node never talks to the Kubernetes API
        "enableServiceLinks": False,
        # SIGTERM stops the node at the next step boundary (the last checkpoint stays usable).
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": GID, "fsGroup": GID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    job_comment = [
        f"{node.id}: a Job, not a Deployment: it runs until the node has trained and exported, and a",
        "finished Job stays finished (no ttlSecondsAfterFinished: a deleted Job would be re-created and",
        "re-run by the next apply). A Job's pod template cannot change: to run another image under the",
        "same digest, delete the Job first (its volume and checkpoints stay).",
        f"Memory: request {request}Mi = the 1.3 GB peak the e2e tests bound a node at (TensorFlow + gRPC",
        "~0.6 GB) + the receive budgets of its other links + 16 bytes a model parameter; limit +512Mi.",
    ]
    if d.dcap:
        job_comment += [
            "attestation dcap: the SGX device nodes belong to the host's sgx/sgx_prv groups; a non-root",
            "node reaches them where the runtime gives devices the pod's user (containerd:",
            "device_ownership_from_security_context = true) or with those groups in supplementalGroups.",
        ]
    docs.append((_comment(job_comment), {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(d, d.obj(node.id), node.id),
        "spec": {
            "backoffLimit": RESTARTS,
            "template": {"metadata": {"labels": _labels(d, node.id)}, "spec": pod},
        },
    }))
    return docs


def _service(d: Party, node: IRNode) -> tuple[str, dict[str, Any]]:
    agreed = (d.agreed or {}).get(node.id)
    secure: dict[str, Any] = {"name": "secure", "protocol": "TCP", "port": PORT, "targetPort": "secure"}
    boot: dict[str, Any] = {"name": "bootstrap", "protocol": "TCP", "port": BOOTSTRAP_PORT,
                            "targetPort": "bootstrap"}
    spec: dict[str, Any] = {"type": {"clusterip": "ClusterIP", "nodeport": "NodePort",
                                     "loadbalancer": "LoadBalancer"}[d.expose],
                            "selector": _selector(d, node.id)}
    comment = [f"{node.id}: reached by its peers in this cluster at {d.obj(node.id)}.{d.namespace()}.svc"]
    if d.expose == "nodeport":
        if agreed is not None:  # the ports the other parties dial are the agreed ones (checked in range)
            secure["nodePort"], boot["nodePort"] = agreed.port, agreed.bootstrap_port
            comment.append(f"and from other clusters at a node's address, ports {agreed.port} and "
                           f"{agreed.bootstrap_port} (as agreed in --addresses)")
        else:
            comment.append("and from other clusters at a node's address and the ports Kubernetes assigns "
                           "(kubectl get svc): put them in the addresses file the parties share")
    elif d.expose == "loadbalancer":
        if agreed is not None:  # the load balancer listens on the agreed ports
            secure["port"], boot["port"] = agreed.port, agreed.bootstrap_port
            comment.append(f"and from other clusters at its load balancer ({agreed.host}), ports "
                           f"{agreed.port} and {agreed.bootstrap_port}")
        else:
            comment.append("and from other clusters at its load balancer's address (kubectl get svc), ports "
                           f"{PORT} and {BOOTSTRAP_PORT}")
    if d.expose != "clusterip":
        # Keep the peers' source addresses (no SNAT to a node's address), which the NetworkPolicy's ipBlock
        # rules match; traffic enters only at nodes that run the pod.
        spec["externalTrafficPolicy"] = "Local"
    spec["ports"] = [secure, boot]
    return _comment(comment), {"apiVersion": "v1", "kind": "Service",
                               "metadata": _meta(d, d.obj(node.id), node.id), "spec": spec}


def _network_policy(d: Party, node: IRNode) -> tuple[str, dict[str, Any]]:
    """Ingress to the node's two ports from its peers in the pipeline only."""
    peers: list[dict[str, Any]] = []
    comment = [f"{node.id} admits connections from its peers in the pipeline only:"]
    for pid, party, _ in d.peers(node):
        peer_pods = {"podSelector": {"matchLabels": _selector(d, pid)}}
        if party == d.name:
            peers.append(peer_pods)
            comment.append(f"  {pid}: its pods in this namespace")
        elif d.agreed is None:
            peers.append({"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": d.namespace(party)}}, **peer_pods})
            comment.append(f"  {pid}: its pods in namespace {d.namespace(party)} (same cluster)")
        elif d.agreed[pid].egress:
            peers += [{"ipBlock": {"cidr": c}} for c in d.agreed[pid].egress]
            comment.append(f"  {pid}: from {', '.join(d.agreed[pid].egress)} (--addresses)")
        else:
            host = d.agreed[pid].host
            comment += [f"  {pid}: NOT ADMITTED: it is reached at the host name {host}, and a",
                        "    NetworkPolicy admits addresses only: add `egress_cidrs` (where its",
                        "    connections come from) to its entry in the addresses file and recompile",
                        "    (docs/deploy.md)"]
            d.notes.append(f"{node.id}'s NetworkPolicy cannot admit {pid} (host name {host}); give "
                           f"`egress_cidrs` for it in --addresses")
    spec: dict[str, Any] = {"podSelector": {"matchLabels": _selector(d, node.id)}, "policyTypes": ["Ingress"]}
    if peers:  # (a rule without `from` would admit everyone: none at all admits no one)
        spec["ingress"] = [{"from": peers, "ports": [{"protocol": "TCP", "port": PORT},
                                                     {"protocol": "TCP", "port": BOOTSTRAP_PORT}]}]
    else:
        spec["ingress"] = []
    return _comment(comment), {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                               "metadata": _meta(d, d.obj(node.id), node.id), "spec": spec}


def node_image_dockerfile(d: Party) -> str:
    """attestation dcap: the signed build of the party's nodes on top of the SGX image. The signed manifest
    (MBs) does not fit a ConfigMap, and it trusts the image's own files by hash, so the signed build and
    the image that signed it travel together."""
    lines = _comment([
        *_header(d, "its node image (attestation dcap)"),
        "",
        "Sign inside the SGX image, so that the files its manifest trusts are the image's:",
        f"  docker run --rm -u \"$(id -u):$(id -g)\" -v \"$PWD:/w\" -w /w {SGX_IMAGE} \\",
        "    compile PIPELINE.flp --sign KEY.pem --entrypoint /opt/fldsl/venv/bin/python3 \\",
        f"    --target kubernetes --party {d.name}",
        "then, with the build folder (BUILD) as the context:",
        f"  docker build -f BUILD/deploy/kubernetes/{d.name}/node-image.Dockerfile -t {d.image} BUILD",
    ]).splitlines()
    lines += [
        f"ARG BASE={SGX_IMAGE}",
        "FROM ${BASE}",
        "USER 0",
        "COPY pycache/ /fldsl/pycache/",
    ]
    for n in d.nodes():
        w = f"/fldsl/nodes/{n.id}"
        lines += [
            f"COPY nodes/{n.id}/ {w}/node/",
            # The working folder gramine-sgx runs in: run/ and data/ are volumes, trust/ stays empty (a real
            # quote needs no simulated trust material).
            f"RUN ln -s /fldsl/pycache {w}/pycache && mkdir {w}/run {w}/data {w}/trust && "
            f"chown {UID}:{GID} {w}/run",
        ]
    lines.append(f"USER {UID}:{GID}")
    return "\n".join(lines) + "\n"


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


# ---------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------


def _services(program: Program) -> dict[str, str]:
    names: dict[str, str] = {}
    for n in program.nodes:
        s = service_name(n.id)
        if s in names.values():
            other = next(k for k, v in names.items() if v == s)
            raise DeployError(f"nodes `{other}` and `{n.id}` map to the same service name `{s}`; rename one")
        names[n.id] = s
    return names


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


# ---------------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------------


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
    return k if re.fullmatch(r"[A-Za-z0-9_./-]+", k) else _scalar(k)


# Characters JSON leaves raw that YAML reads otherwise: C1 controls and DEL (not printable in YAML), NEL and
# the Unicode line separators (line breaks to YAML 1.1 readers), lone surrogates, the BOM, non-characters.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\ufffe\uffff]")


def _scalar(x: Any) -> str:
    if isinstance(x, dict):
        return "{}"
    if isinstance(x, list):
        return json.dumps(x)
    text = json.dumps(x, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
