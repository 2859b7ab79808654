"""``--target kubernetes``: a party's namespace, and for each node its Job, Service, NetworkPolicy,
ConfigMap and sealed-storage claim (plus the node image's Dockerfile for dcap)."""

from __future__ import annotations

from typing import Any

from fldsl.artifacts import dump_json
from fldsl.compiler.deploy_party import (
    AESM,
    BOOTSTRAP_PORT,
    CPU_LIMIT,
    CPU_REQUEST,
    DATA,
    GID,
    PORT,
    RESTARTS,
    SEALED_STORAGE,
    SGX_IMAGE,
    UID,
    Party,
    _comment,
    _csv_data,
    _enclave_quantity,
    _env,
    _header,
    _labels,
    _meta,
    _node_command,
    _node_files,
    _selector,
    _trust_items,
    addresses_for,
    memory_mib,
    secret_command,
    service_name,
)
from fldsl.compiler.ir import IRNode
from fldsl.compiler.yaml_text import _yaml


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

    mounts, volumes = _mounts_and_volumes(d, node, workdir, csv)
    request, limit = memory_mib(d.program, node)
    container = _container(d, node, workdir, csv, _resources(d, request, limit), mounts)
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
    docs.append(_job(d, node, pod, request))
    return docs


def _mounts_and_volumes(
    d: Party, node: IRNode, workdir: str, csv: list[tuple[str, str]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The node container's mounts and the pod's volumes."""
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

    return mounts, volumes


def _resources(d: Party, request: int, limit: int) -> dict[str, Any]:
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
    return resources


def _container(
    d: Party, node: IRNode, workdir: str, csv: list[tuple[str, str]], resources: dict[str, Any],
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
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
    return container


def _job(d: Party, node: IRNode, pod: dict[str, Any], request: int) -> tuple[str, dict[str, Any]]:
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
    return (_comment(job_comment), {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(d, d.obj(node.id), node.id),
        "spec": {
            "backoffLimit": RESTARTS,
            "template": {"metadata": {"labels": _labels(d, node.id)}, "spec": pod},
        },
    })


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
