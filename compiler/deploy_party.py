"""One party's deployment, what both targets share: names, ports, addresses, resources, the node's
command, labels and the trust material (fldsl.compiler.deploy writes the files; docs/deploy.md)."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fldsl import __version__
from fldsl.artifacts import FILE_READERS
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
