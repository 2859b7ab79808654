"""Per-party simulated trust: each party holds only its own secrets and pins its peers' public identities.

A *trust root* (``.fldsl/trust`` by default) holds one folder per party. On a party's host it holds only
that party's folder; a local run of the whole pipeline (``fldsl run BUILD``) simulates every organisation on
one machine with one folder each::

    <root>/<party>/
        root_ca.pem root_ca.key pck.pem pck.key        the party's own simulated quoting chain
        attestation.key enclave_signing.key sealing.key   (sim.FILES; private ones 0600)
        identity.json                                   the party's PUBLIC identity: what its peers pin
        peers/<other>.json                              the identities of the other parties, as received

A node's ``--trust-dir`` is its party's folder. It quotes with its party's keys and accepts a peer's sim
quote only if it chains to the root that the *peer's* party published: a host of one party cannot mint quotes
for another party's nodes, nor open another party's sealed checkpoints or models.

``identity.json`` travels between organisations the way an SSH host key does: by any channel, then checked
by its fingerprint over a second one (``fldsl trust init`` and ``fldsl trust add-peer`` print it).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fldsl.runtime.attestation import crypto
from fldsl.runtime.attestation.backend import AttestationError
from fldsl.runtime.attestation.sim import FILES, SimDeployment, trust_init

IDENTITY_FILE = "identity.json"
PEERS_DIR = "peers"
IDENTITY_FORMAT: Final = "fldsl.party-identity/1"
MAX_IDENTITY_BYTES = 64 << 10  # a root certificate and a few names; anything larger is not an identity
_PARTY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # the grammar's identifiers: a party name is one


def party_of(node_id: str) -> str:
    """``media.trainer`` → ``media``."""
    return node_id.split(".", 1)[0]


class PartyIdentity(BaseModel):
    """``identity.json``: a party's public simulated identity (no secret in it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fldsl.party-identity/1"] = IDENTITY_FORMAT
    party: str
    sim_root_ca: str  # PEM of the party's simulated root CA: peers' sim quotes must chain to it
    sim_mr_signer: str  # hex MRSIGNER of the party's simulated enclave-signing key (informational)

    @field_validator("party")
    @classmethod
    def _party_name(cls, v: str) -> str:
        if not _PARTY.match(v):
            raise ValueError(f"party name {v!r} is not an identifier")
        return v

    @field_validator("sim_root_ca")
    @classmethod
    def _root(cls, v: str) -> str:
        try:
            cert = x509.load_pem_x509_certificate(v.encode())
        except ValueError as e:
            raise ValueError(f"sim_root_ca is not a PEM certificate: {e}") from None
        try:
            cert.verify_directly_issued_by(cert)
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (InvalidSignature, ValueError, TypeError, x509.ExtensionNotFound):
            raise ValueError("sim_root_ca is not a self-signed CA certificate") from None
        if not constraints.ca:
            raise ValueError("sim_root_ca is not a CA certificate")
        return v

    @property
    def root_pem(self) -> bytes:
        return self.sim_root_ca.encode()

    def fingerprint(self) -> str:
        """SHA-256 of the root certificate (DER), as ``openssl x509 -fingerprint -sha256`` prints it."""
        der = x509.load_pem_x509_certificate(self.root_pem).public_bytes(serialization.Encoding.DER)
        digest = hashlib.sha256(der).hexdigest().upper()
        return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))

    def dump(self) -> bytes:
        return (json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n").encode()


def load_identity(path: Path) -> PartyIdentity:
    """Read and check an identity file; AttestationError names the file and what is wrong."""
    try:
        if path.is_symlink():
            raise AttestationError(f"{path}: is a symbolic link; give the identity file itself")
        with open(path, "rb") as f:
            data = f.read(MAX_IDENTITY_BYTES + 1)
    except OSError as e:
        raise AttestationError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_IDENTITY_BYTES:
        raise AttestationError(f"{path}: larger than {MAX_IDENTITY_BYTES >> 10} KiB; not a party identity")
    try:
        return PartyIdentity.model_validate_json(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}"
                             for err in e.errors())
        raise AttestationError(f"{path}: not an fldsl party identity ({problems})") from None


def identity_of(dep: SimDeployment, party: str) -> PartyIdentity:
    return PartyIdentity(party=party, sim_root_ca=dep.root_cert_pem.decode(),
                         sim_mr_signer=dep.mr_signer.hex())


def party_folder(root: Path, party: str) -> Path:
    if not _PARTY.match(party):
        raise AttestationError(f"party name {party!r} is not an identifier")
    return Path(root) / party


def init_party(root: Path, party: str) -> tuple[SimDeployment, PartyIdentity]:
    """Create (or reuse) ``root/party``: the party's own material and its public ``identity.json``.

    A folder that already names another party, or whose identity.json no longer matches its root key, is
    refused: reusing it would hand one party's keys to another."""
    d = party_folder(root, party)
    if Path(root).is_symlink():
        raise AttestationError(f"{root}: is a symbolic link; give the trust folder's real path")
    Path(root).mkdir(parents=True, exist_ok=True)
    ident_path = d / IDENTITY_FILE
    if ident_path.exists() or ident_path.is_symlink():
        existing = load_identity(ident_path)
        if existing.party != party:
            raise AttestationError(
                f"{d}: holds the trust material of party `{existing.party}`, not `{party}`")
    dep = trust_init(d, party=party)
    ident = identity_of(dep, party)
    if ident_path.exists():
        if load_identity(ident_path) != ident:
            raise AttestationError(f"{ident_path}: does not match {d / FILES['root_cert']} (edited, or the "
                                   "keys were replaced); remove identity.json to write it anew")
    else:
        crypto.write_public(ident_path, ident.dump())
        dep.created.append(IDENTITY_FILE)
    (d / PEERS_DIR).mkdir(mode=0o755, exist_ok=True)
    return dep, ident


def add_peer(folder: Path, ident: PartyIdentity, *, replace: bool = False) -> str:
    """Pin another party's identity in ``folder/peers``; returns ``added``, ``unchanged`` or ``replaced``.

    A different identity for a party already pinned is refused unless ``replace``: like an SSH host key that
    changed, it is either a re-keyed peer (confirm it out of band) or someone standing in for it."""
    own = load_identity(folder / IDENTITY_FILE)
    if ident.party == own.party:
        raise AttestationError(f"{folder} is party `{own.party}`'s own folder; its identity is not a peer's")
    peers = folder / PEERS_DIR
    if peers.is_symlink():
        raise AttestationError(f"{peers}: is a symbolic link; trust material must be plain files")
    peers.mkdir(mode=0o755, exist_ok=True)
    dst = peers / f"{ident.party}.json"
    state = "added"
    if dst.exists() or dst.is_symlink():
        pinned = load_identity(dst)
        if pinned == ident:
            return "unchanged"
        if not replace:
            raise AttestationError(
                f"{dst}: party `{ident.party}` is already pinned with another identity (pinned "
                f"{pinned.fingerprint()}, offered {ident.fingerprint()}); confirm the new fingerprint with "
                "that party, then add it with --replace")
        dst.unlink()
        state = "replaced"
    try:
        crypto.write_public(dst, ident.dump())
    except FileExistsError:  # another launcher pinned it meanwhile: fine if it pinned the same identity
        if load_identity(dst) != ident:
            raise AttestationError(
                f"{dst}: written meanwhile with another identity of `{ident.party}`") from None
        return "unchanged"
    return state


def sim_roots(folder: Path, parties: list[str] | None = None) -> dict[str, bytes]:
    """``{party: root PEM}`` a node of this folder's party accepts sim quotes from: its own party's root and
    the pinned peers' (only those of ``parties`` when given: a node reads just the identities it needs, the
    files its manifest allows). Raises AttestationError when the folder is not a party folder."""
    own = _own_identity(folder)
    ident_path = folder / IDENTITY_FILE
    if own.root_pem != (folder / FILES["root_cert"]).read_bytes():
        raise AttestationError(f"{ident_path}: does not match {folder / FILES['root_cert']}")
    roots = {own.party: own.root_pem}
    peers = folder / PEERS_DIR
    if peers.is_dir():
        wanted = None if parties is None else {p for p in parties if p != own.party}
        paths = sorted(peers.glob("*.json")) if wanted is None else [
            peers / f"{p}.json" for p in sorted(wanted) if (peers / f"{p}.json").exists()]
        for path in paths:
            ident = load_identity(path)
            if path.stem != ident.party:
                raise AttestationError(f"{path}: holds party `{ident.party}`'s identity under another name")
            if ident.party == own.party:
                raise AttestationError(f"{path}: a peer entry for this folder's own party `{own.party}`")
            roots[ident.party] = ident.root_pem
    return roots


def _own_identity(folder: Path) -> PartyIdentity:
    ident_path = folder / IDENTITY_FILE
    if not ident_path.exists():
        raise AttestationError(
            f"{folder}: not a party's trust folder (no {IDENTITY_FILE}); make it with "
            f"`fldsl trust init --party {folder.name} --trust-dir {folder.parent}`")
    return load_identity(ident_path)


def folder_party(folder: Path) -> str:
    """The party a trust folder belongs to (its identity.json)."""
    return _own_identity(folder).party


def local_deployment(root: Path, parties: list[str]) -> list[str]:
    """Every party of a pipeline simulated on this machine: one folder each, each pinning the others.
    Returns what was created (``party/file``), for the launcher to report."""
    created: list[str] = []
    idents: dict[str, PartyIdentity] = {}
    for party in sorted(set(parties)):
        dep, idents[party] = init_party(root, party)
        created += [f"{party}/{name}" for name in dep.created]
    for party in idents:
        folder = party_folder(root, party)
        for other, ident in idents.items():
            if other != party and add_peer(folder, ident) == "added":
                created.append(f"{party}/{PEERS_DIR}/{other}.json")
    return created


def secret_files(folder: Path) -> list[Path]:
    """The private files of a party folder (for tests and audits: none may appear in another's)."""
    from fldsl.runtime.attestation.sim import SECRET_FILES

    return [folder / FILES[kind] for kind in sorted(SECRET_FILES) if (folder / FILES[kind]).exists()]


__all__ = [
    "IDENTITY_FILE", "PEERS_DIR", "PartyIdentity", "add_peer", "folder_party", "identity_of", "init_party",
    "load_identity", "local_deployment", "party_folder", "party_of", "secret_files", "sim_roots",
]
