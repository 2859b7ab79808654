"""The data owner's key service: releases a data key only to an attested enclave, and the node's client.

This is Gramine's "secret provisioning" done with fldsl's own RA-TLS certificates. A node that runs under
Gramine with an ``encrypted`` mount (``key_name = "data"``) must write that key into
``/dev/attestation/keys/data`` before it opens its data files. It asks the data owner's key service:

    request = CBOR {"v": 1, "cert": RA-TLS certificate PEM, "name": key name, "node": node id}
    reply   = CBOR {"v": 1, "alg": ALG, "epk": ephemeral public point, "nonce": 12 bytes, "ct": ciphertext}

The service verifies the certificate exactly as a peer node would (:class:`PeerVerifier`: quote genuine,
pins digest, measurement, node id, validity window), checks that the key is granted to that node, and
encrypts the key **to the certificate's public key** (ECIES): an ephemeral ECDH key on the certificate key's
curve, HKDF-SHA256 whose info binds the key name, the node id, the attested pins digest, the certificate
key and the ephemeral key, then AES-256-GCM with the same binding as associated data. Only the holder of
the enclave's private key (which never leaves the enclave) can open the reply, so the channel needs no TLS
for confidentiality and a replayed certificate earns its sender nothing usable.

What this does not give (docs/keys.md): the node does not authenticate the service. A host that
intercepts the request can answer with a key of its own choosing; the node then opens only files encrypted
under that key, so the host could substitute data it fabricated itself, never read the owner's data.

Refusals travel as gRPC status + a ``fldsl-refusal-bin`` trailer (CBOR {field, expected, actual, message});
the client raises :class:`KeyRefused`, a :class:`PeerRefused`, so the node reports it as a trust failure.
Key material is never logged.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fldsl.runtime.attestation.ratls import LocalIdentity, parse_certificate
from fldsl.runtime.attestation.verify import PeerRefused, PeerVerifier

log = logging.getLogger("fldsl.keyservice")

METHOD = "/fldsl.KeyService/GetKey"
PROTOCOL = "fldsl.keyservice/1"
KEY_BYTES = 16  # Gramine's protected-file keys are exactly 128 bits
MAX_CERT_BYTES = 64 << 10  # fldsl certificates are ~10 KiB (two quotes with a cert chain)
MAX_REQUEST_BYTES = MAX_CERT_BYTES + (4 << 10)  # certificate + names + CBOR framing
MAX_WIRE_BYTES = 256 << 10  # gRPC refuses larger messages before our handler sees them
MAX_REPLY_BYTES = 4 << 10
REFUSAL_TRAILER = "fldsl-refusal-bin"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # also a file name under /dev/attestation/keys
_NODE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CURVES: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1()}


class KeyServiceError(Exception):
    """Fetching a key failed; ``str()`` is user-facing."""


class KeyRefused(KeyServiceError, PeerRefused):
    """The service refused (or would refuse) the request; ``field`` names what failed, as PeerRefused."""


class KeyServiceUnavailable(KeyServiceError):
    """The key service could not be reached within the timeout."""


class KeyReplyError(KeyServiceError):
    """The service's reply is malformed or does not open with this enclave's key."""


def _refused(field: str, expected: object, actual: object, detail: str) -> KeyRefused:
    message = f"{field} expected {expected}, got {actual} — {detail}"
    return KeyRefused(field, str(expected), str(actual), message)


# ---------------------------------------------------------------------------------------------------------
# ECIES to the certificate key (both sides)
# ---------------------------------------------------------------------------------------------------------


def _alg(curve: ec.EllipticCurve) -> str:
    return f"ECDH-{curve.name}+HKDF-SHA256+AES-256-GCM"


def _binding(name: str, node: str, pins_digest: bytes, spki_der: bytes, epk: bytes) -> bytes:
    """HKDF info and GCM associated data: a reply opens only for this key name, node, deployment, enclave
    key and ephemeral key (a reply replayed to another request, or relabelled, fails its tag)."""
    return cbor2.dumps([PROTOCOL, name, node, pins_digest, hashlib.sha256(spki_der).digest(), epk])


def _kdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=PROTOCOL.encode(), info=info).derive(shared)


def wrap_key(key: bytes, *, spki_der: bytes, name: str, node: str, pins_digest: bytes) -> bytes:
    """Encrypt ``key`` to the EC public key ``spki_der``; returns the CBOR reply."""
    pub = serialization.load_der_public_key(spki_der)
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name not in _CURVES:
        raise _refused("pubkey", "an ECDSA P-256 or P-384 certificate key", type(pub).__name__,
                       "the certificate key cannot receive a key")
    eph = ec.generate_private_key(_CURVES[pub.curve.name])
    epk = eph.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    info = _binding(name, node, pins_digest, spki_der, epk)
    nonce = os.urandom(12)
    ct = AESGCM(_kdf(eph.exchange(ec.ECDH(), pub), info)).encrypt(nonce, key, info)
    return cbor2.dumps({"v": 1, "alg": _alg(pub.curve), "epk": epk, "nonce": nonce, "ct": ct})


def unwrap_key(reply: bytes, *, identity: LocalIdentity, name: str) -> bytes:
    """Open a reply with the enclave's private key. Raises :class:`KeyReplyError`."""
    if len(reply) > MAX_REPLY_BYTES:
        raise KeyReplyError(f"key service reply too large ({len(reply)} bytes)")
    doc = _decode_map(reply, {"v", "alg", "epk", "nonce", "ct"}, KeyReplyError, "reply")
    priv = serialization.load_pem_private_key(identity.key_pem, password=None)
    if not isinstance(priv, ec.EllipticCurvePrivateKey):
        raise KeyReplyError("this identity's key is not an EC key; cannot open the reply")
    epk, nonce, ct = doc["epk"], doc["nonce"], doc["ct"]
    if doc["v"] != 1 or doc["alg"] != _alg(priv.curve):
        raise KeyReplyError(f"key service reply uses {doc['alg']!r}, expected {_alg(priv.curve)!r}")
    if not all(isinstance(x, bytes) for x in (epk, nonce, ct)) or len(nonce) != 12:
        raise KeyReplyError("key service reply: malformed fields")
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(priv.curve, epk)
    except ValueError:
        raise KeyReplyError("key service reply: the ephemeral key is not a point on the curve") from None
    ev = parse_certificate(identity.cert_pem)
    info = _binding(name, identity.node_id, ev.pins_digest or b"", ev.spki_der, epk)
    try:
        key = AESGCM(_kdf(priv.exchange(ec.ECDH(), peer), info)).decrypt(nonce, ct, info)
    except InvalidTag:
        raise KeyReplyError(
            f"the key service's reply for `{name}` does not open with this enclave's key (it was encrypted "
            "to another certificate, or altered in transit)") from None
    if len(key) != KEY_BYTES:
        raise KeyReplyError(f"key `{name}` has {len(key)} bytes, expected {KEY_BYTES}")
    return key


def _decode_map(data: bytes, keys: set[str], error: type[Exception], what: str) -> dict[str, Any]:
    fp = io.BytesIO(data)
    try:
        doc = cbor2.CBORDecoder(fp).decode()
    except Exception as e:  # cbor2 raises assorted errors on hostile input; all mean "malformed"
        raise error(f"{what}: not valid CBOR ({type(e).__name__})") from None
    if fp.tell() != len(data) or not isinstance(doc, dict) or set(doc) != keys:
        raise error(f"{what}: expected a CBOR map with exactly {sorted(keys)}")
    return doc


# ---------------------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    cert: bytes
    name: str
    node: str


def _parse_request(data: bytes) -> _Request:
    # Sizes are checked before any parsing: a hostile client controls every byte.
    if len(data) > MAX_REQUEST_BYTES:
        raise _refused("request", f"at most {MAX_REQUEST_BYTES} bytes", f"{len(data)} bytes",
                       "oversized request")

    def malformed(msg: str) -> KeyRefused:
        return _refused("request", "a CBOR key request", "malformed", msg)

    try:
        doc = _decode_map(data, {"v", "cert", "name", "node"}, ValueError, "request")
    except ValueError as e:
        raise malformed(str(e)) from None
    cert, name, node = doc["cert"], doc["name"], doc["node"]
    if doc["v"] != 1:
        raise _refused("request", "protocol version 1", doc["v"], "client of another fldsl version")
    if not isinstance(cert, bytes):
        raise malformed("cert must be bytes (PEM)")
    if len(cert) > MAX_CERT_BYTES:
        raise _refused("certificate", f"at most {MAX_CERT_BYTES} bytes", f"{len(cert)} bytes",
                       "oversized certificate")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise malformed("name must be a key name ([A-Za-z0-9_.-], at most 64 characters)")
    if not isinstance(node, str) or not _NODE.fullmatch(node):
        raise malformed("node must be a node id")
    return _Request(cert, name, node)


class KeyService:
    """Holds the data owner's keys and releases each only to attested, granted nodes.

    ``keys``: key name -> 16-byte key; ``grants``: key name -> node ids allowed to fetch it; ``verifier``:
    built from the deployment's pins and policy (:func:`verifier_from_build`)."""

    def __init__(self, keys: Mapping[str, bytes], grants: Mapping[str, Sequence[str]],
                 verifier: PeerVerifier) -> None:
        for name, key in keys.items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"bad key name {name!r}: use [A-Za-z0-9_.-], at most 64 characters")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key `{name}` has {len(key)} bytes; Gramine keys are {KEY_BYTES} bytes")
        unknown = sorted(set(grants) - set(keys))
        if unknown:
            raise ValueError(f"grants for keys that are not served: {', '.join(unknown)}")
        self._keys = {n: bytes(k) for n, k in keys.items()}
        self._grants = {n: frozenset(nodes) for n, nodes in grants.items()}
        self._verifier = verifier

    def __repr__(self) -> str:  # keeps the keys out of logs and tracebacks
        grants = {n: sorted(g) for n, g in self._grants.items()}
        return f"KeyService(keys={sorted(self._keys)}, grants={grants})"

    def handle(self, data: bytes) -> bytes:
        """One request -> the wrapped key. Raises :class:`KeyRefused`; logs the decision, never the key."""
        req = None
        try:
            req = _parse_request(data)
            verdict = self._verifier.verify(req.cert, expect_node=req.node)
            allowed = self._grants.get(req.name, frozenset())
            if verdict.node_id not in allowed or req.name not in self._keys:
                expected = ("one of " + ", ".join(sorted(allowed))) if allowed else "a granted node"
                raise _refused("grant", expected, verdict.node_id,
                               f"key `{req.name}` is not granted to {verdict.node_id} (keys serve --grant)")
            ev = verdict.evidence
            reply = wrap_key(self._keys[req.name], spki_der=ev.spki_der, name=req.name, node=verdict.node_id,
                             pins_digest=ev.pins_digest or b"")
        except PeerRefused as e:
            name, node = (req.name, req.node) if req else ("?", "?")
            log.warning("refused key %s to %s: field %s: %s", name, node, e.field, e)
            if isinstance(e, KeyRefused):
                raise
            raise KeyRefused(e.field, e.expected, e.actual, str(e)) from None
        log.info("granted key %s to %s (%s)", req.name, verdict.node_id, verdict.summary)
        return reply

    def _rpc(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self.handle(request)
        except KeyRefused as e:
            bad_input = e.field == "request"
            code = grpc.StatusCode.INVALID_ARGUMENT if bad_input else grpc.StatusCode.PERMISSION_DENIED
            refusal = {"field": e.field, "expected": e.expected, "actual": e.actual, "message": str(e)}
            context.set_trailing_metadata(((REFUSAL_TRAILER, cbor2.dumps(refusal)),))
            context.abort(code, str(e))
        except Exception as e:  # never a traceback (nor key material) to the client
            log.exception("key request failed")
            context.abort(grpc.StatusCode.INTERNAL, f"key service internal error ({type(e).__name__})")
        raise AssertionError("unreachable")  # context.abort raises

    def serve(self, host: str = "127.0.0.1", port: int = 0, *, workers: int = 4) -> KeyServer:
        """Start serving on ``host:port`` (0 picks a free port); returns the running server."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keyservice"),
            options=[("grpc.max_receive_message_length", MAX_WIRE_BYTES),
                     ("grpc.max_send_message_length", MAX_REPLY_BYTES)],
            maximum_concurrent_rpcs=4 * workers,
        )
        handler = grpc.unary_unary_rpc_method_handler(self._rpc)  # bytes in, bytes out
        service, method = METHOD.strip("/").split("/")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(target)
        except RuntimeError as e:  # grpcio raises when it cannot bind
            raise KeyServiceError(f"cannot listen on {target}: {e}") from None
        if bound == 0:
            raise KeyServiceError(f"cannot listen on {target}")
        server.start()
        return KeyServer(server, host, bound)


class KeyServer:
    """A running key service; ``address`` is ``host:port`` as bound."""

    def __init__(self, server: grpc.Server, host: str, port: int) -> None:
        self._server = server
        self.host, self.port = host, port
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def verifier_from_build(build_dir: Path, node_ids: Sequence[str], trust_dir: Path) -> PeerVerifier:
    """The verifier a node of this build would use for its peers (pins + the policy's attestation
    requirement), for the nodes in ``node_ids``; ``trust_dir`` is the service operator's party folder (its own
    root and its pinned peers'). Raises ``ArtifactError`` / ``AttestationError`` / ``ValueError`` with a
    user-facing message."""
    from fldsl.artifacts import Pins, Policy, load_model, node_dir
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.parties import party_of, sim_roots

    if not node_ids:
        raise ValueError("no node is granted a key")
    pins_files = sorted((build_dir / "nodes").glob("*/pins.json"))
    if not pins_files:
        raise ValueError(f"{build_dir}: no nodes/*/pins.json (was the pipeline compiled?)")
    pins = load_model(Pins, pins_files[0])
    for other in pins_files[1:]:
        if load_model(Pins, other) != pins:  # one deployment, one pin table
            raise ValueError(f"{other} differs from {pins_files[0]}: the build is not one deployment")
    requirement = None
    for node in node_ids:
        if node not in pins.nodes:
            raise ValueError(f"no node `{node}` in {build_dir} (nodes: {', '.join(sorted(pins.nodes))})")
        req = load_model(Policy, node_dir(build_dir, node) / "policy.json").attestation
        if requirement is not None and req != requirement:
            raise ValueError(f"nodes {', '.join(node_ids)} have different attestation requirements")
        requirement = req
    assert requirement is not None
    roots: dict[str, bytes] = {}
    if requirement.mode == "sim":  # sim quotes chain to the root each node's party published
        roots = sim_roots(trust_dir)
        missing = sorted({party_of(n) for n in node_ids} - set(roots))
        if missing:
            raise AttestationError(f"{trust_dir}: no identity pinned for party {', '.join(missing)}; add it "
                                   "with `fldsl trust add-peer FILE --party PARTY`")
    return PeerVerifier(pins, requirement, sim_roots=roots, own_pins_digest=pins.digest())


# ---------------------------------------------------------------------------------------------------------
# client (runs in the node)
# ---------------------------------------------------------------------------------------------------------


def fetch_key(address: str, *, identity: LocalIdentity, node_id: str, name: str,
              timeout: float = 30.0) -> bytes:
    """Ask the key service at ``address`` (``host:port``) for key ``name``; returns the 16-byte key.

    Waits up to ``timeout`` seconds for the service to come up. Raises :class:`KeyRefused` (a
    ``PeerRefused``: a trust failure naming the field), :class:`KeyServiceUnavailable` or
    :class:`KeyReplyError`."""
    if node_id != identity.node_id:
        raise ValueError(f"identity is for {identity.node_id}, not {node_id}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad key name {name!r}")
    request = cbor2.dumps({"v": 1, "cert": identity.cert_pem, "name": name, "node": node_id})
    options = [("grpc.max_receive_message_length", MAX_REPLY_BYTES),
               ("grpc.max_send_message_length", MAX_WIRE_BYTES)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(METHOD)
        try:
            reply = call(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise _client_error(e, address, name) from None
    return unwrap_key(reply, identity=identity, name=name)


def _client_error(e: grpc.RpcError, address: str, name: str) -> KeyServiceError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == REFUSAL_TRAILER and isinstance(value, bytes) and len(value) <= 8192:
            try:
                doc = _decode_map(value, {"field", "expected", "actual", "message"}, ValueError, "refusal")
                if all(isinstance(v, str) for v in doc.values()):
                    return KeyRefused(doc["field"], doc["expected"], doc["actual"],
                                      f"key service {address} refused key `{name}`: {doc['message']}")
            except ValueError:
                break
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
        refusal = _refused("request", f"at most {MAX_WIRE_BYTES} bytes", "larger", details or "oversized")
        refusal.message = f"key service {address} refused key `{name}`: {refusal.message}"
        return refusal
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED):  # the last: too many requests at once
        return KeyServiceUnavailable(f"key service {address} unreachable while fetching `{name}`: {details}")
    return KeyServiceError(f"key service {address} failed for `{name}`: {code.name if code else '?'}: "
                           f"{details}")


def install_gramine_key(name: str, key: bytes, root: str | Path = "/dev/attestation/keys") -> None:
    """Write ``key`` into Gramine's ``/dev/attestation/keys/<name>`` (one write of exactly 16 bytes).

    The file exists only when the manifest declares that key name (an ``encrypted`` mount's ``key_name``
    or ``fs.insecure__keys``); it is never created here, so a missing declaration is reported, not hidden.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad key name {name!r}")
    if len(key) != KEY_BYTES:
        raise ValueError(f"Gramine keys are {KEY_BYTES} bytes, got {len(key)}")
    path = Path(root) / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyServiceError(f"{path} does not exist: the manifest declares no key `{name}` (an encrypted "
                              f"mount with key_name = \"{name}\")") from None
    except OSError as e:
        raise KeyServiceError(f"cannot open {path}: {e.strerror}") from None
    try:
        written = os.write(fd, key)  # Gramine takes the key from this one write, on close
        if written != KEY_BYTES:
            raise KeyServiceError(f"{path}: short write ({written} of {KEY_BYTES} bytes)")
    except OSError as e:
        raise KeyServiceError(f"cannot write {path}: {e.strerror}") from None
    finally:
        try:
            os.close(fd)
        except OSError as e:  # Gramine validates the key when the file is closed
            raise KeyServiceError(f"{path}: key refused on close: {e.strerror}") from None
