"""The simulated attestation backend: real signatures, simulated hardware.

``trust_init(dir)`` creates a deployment's trust material (all SIMULATED, none of it from Intel)::

    root_ca.pem / root_ca.key        "fldsl SIMULATED SGX Root CA — not Intel" (self-signed, P-256)
    pck.pem / pck.key                a PCK-like certificate signed by that root (signs the QE report)
    attestation.key                  the ECDSA P-256 attestation key (signs header ‖ report body)
    enclave_signing.key              RSA-3072, e=3: the deployment's "enclave signing key" → MRSIGNER
    sealing.key                      32 random bytes: root of every sealing key in sim mode

Private files are created 0600 and never overwritten. A sim quote has exactly the v3 layout of a real DCAP
quote (Intel's ``sgx_quote_3.h`` layout) with the distinct vendor id ``SIM_QE_VENDOR_ID``, so Intel's QVL can
never accept it, and :func:`verify_sim_quote` runs the same chain checks as QVL (PCK chain to the root, QE
report signed by the PCK key, QE report binding the attestation key, quote signed by the attestation key)
against the deployment's sim root instead of Intel's.

What this proves and what it cannot (docs/trust.md): a sim quote shows that whoever produced it holds the
deployment's attestation key and computed ``mr_enclave`` from the files it runs; it cannot show that the
code runs inside an enclave — any process with read access to the trust directory can forge sim quotes.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fldsl.artifacts import Identity
from fldsl.measurement import mr_signer_of, sim_mr_enclave, sim_mr_enclave_gramine
from fldsl.runtime.attestation import crypto
from fldsl.runtime.attestation.backend import AttestationError, Verdict
from fldsl.runtime.attestation.quote import (
    CERT_TYPE_PCK_CHAIN,
    FLAG_DEBUG,
    FLAG_INIT,
    FLAG_MODE64BIT,
    SIM_QE_VENDOR_ID,
    Quote,
    QuoteError,
    build_header,
    build_quote,
    make_report_body,
)

ROOT_CN = "fldsl SIMULATED SGX Root CA — not Intel"
PCK_CN = "fldsl SIMULATED SGX PCK Certificate — not Intel"
DEFAULT_TRUST_DIR = Path(".fldsl/trust")
# The simulated quoting enclave's identity (what its QE report shows); any fixed value works.
SIM_QE_MR_ENCLAVE = hashlib.sha256(b"fldsl simulated quoting enclave").digest()
SIM_QE_AUTH_DATA = bytes(range(32))  # Intel QE3 uses 00..1f too

FILES = {
    "root_cert": "root_ca.pem",
    "root_key": "root_ca.key",
    "pck_cert": "pck.pem",
    "pck_key": "pck.key",
    "attestation_key": "attestation.key",
    "signing_key": "enclave_signing.key",
    "sealing_key": "sealing.key",
}
SECRET_FILES = {"root_key", "pck_key", "attestation_key", "signing_key", "sealing_key"}


@dataclass
class SimDeployment:
    """A deployment's simulated trust material (see module docstring). Holds private keys: never log it."""

    dir: Path
    root_cert_pem: bytes
    pck_cert_pem: bytes
    attestation_key: ec.EllipticCurvePrivateKey = field(repr=False)
    pck_key: ec.EllipticCurvePrivateKey = field(repr=False)
    signing_key: rsa.RSAPrivateKey = field(repr=False)
    sealing_key: bytes = field(repr=False)
    created: list[str] = field(default_factory=list)  # file names created by the trust_init that loaded it

    @property
    def mr_signer(self) -> bytes:
        return mr_signer_of(self.signing_key)

    @property
    def sealing_key_path(self) -> Path:
        return self.dir / FILES["sealing_key"]

    @classmethod
    def load(cls, directory: Path | str) -> SimDeployment:
        """Load existing trust material; raises AttestationError naming what is missing (no creation)."""
        d = Path(directory)
        missing = [name for name in FILES.values() if not (d / name).is_file()]
        if missing:
            raise AttestationError(
                f"{d}: simulated trust material incomplete (missing {', '.join(sorted(missing))}); "
                f"run `fldsl trust init {d}`"
            )
        try:
            att = _load_key(d / FILES["attestation_key"])
            pck = _load_key(d / FILES["pck_key"])
            signing = _load_key(d / FILES["signing_key"])
            root_pem = (d / FILES["root_cert"]).read_bytes()
            pck_pem = (d / FILES["pck_cert"]).read_bytes()
            x509.load_pem_x509_certificate(root_pem)
            x509.load_pem_x509_certificate(pck_pem)
        except ValueError as e:
            raise AttestationError(f"{d}: unreadable trust material: {e}") from None
        sealing = (d / FILES["sealing_key"]).read_bytes()
        if not isinstance(att, ec.EllipticCurvePrivateKey) or not isinstance(pck, ec.EllipticCurvePrivateKey):
            raise AttestationError(f"{d}: attestation.key and pck.key must be ECDSA P-256 keys")
        if not isinstance(signing, rsa.RSAPrivateKey) or signing.key_size != 3072:
            raise AttestationError(f"{d}: enclave_signing.key must be an RSA-3072 key")
        if len(sealing) != 32:
            raise AttestationError(f"{d}: sealing.key must hold 32 bytes, found {len(sealing)}")
        return cls(d, root_pem, pck_pem, att, pck, signing, sealing)

    def backend(self, *, mr_enclave: bytes, isv_prod_id: int, isv_svn: int, debug: bool) -> SimBackend:
        return SimBackend(self, mr_enclave=mr_enclave, isv_prod_id=isv_prod_id, isv_svn=isv_svn, debug=debug)


def _load_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fldsl")]
    )


def _ca_cert(key: ec.EllipticCurvePrivateKey, now: dt.datetime, party: str | None) -> x509.Certificate:
    # The party in the name is for people reading certificates (fldsl inspect); trust rests on the key.
    cn = ROOT_CN if party is None else f"{ROOT_CN} — party {party}"
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )


def _pck_cert(
    key: ec.EllipticCurvePrivateKey, root_key, root_cert: x509.Certificate, now
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(PCK_CN))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )


def trust_init(directory: Path | str = DEFAULT_TRUST_DIR, *, party: str | None = None) -> SimDeployment:
    """Create (or reuse) one party's simulated trust material; existing files are never overwritten.
    (fldsl.runtime.attestation.parties adds the party's public identity and its peers.)"""
    d = Path(directory)
    if d.is_symlink():  # chmod and key files would land wherever the link points
        raise AttestationError(f"{d}: is a symbolic link; give the trust folder's real path")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    # Launchers on one machine may race to create the material: one creates, the others then reuse it.
    with open(d / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _init_locked(d, party)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_existing(d: Path, p: dict[str, Path]) -> None:
    """Reused files must be what init would have made: plain files, private ones readable by us alone."""
    for kind, path in p.items():
        if path.is_symlink():
            raise AttestationError(f"{path}: is a symbolic link; trust material must be plain files in {d}")
        if kind in SECRET_FILES and path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise AttestationError(
                    f"{path}: private key readable by others (mode {mode:04o}); fix it with "
                    f"`chmod 600 {path}` or remove it to make a new one")


def _init_locked(d: Path, party: str | None) -> SimDeployment:
    p = {k: d / v for k, v in FILES.items()}
    _check_existing(d, p)
    created: list[str] = []
    now = dt.datetime.now(dt.UTC)

    def make(kind: str, data: bytes) -> None:
        (crypto.write_secret if kind in SECRET_FILES else crypto.write_public)(p[kind], data)
        created.append(FILES[kind])

    root_present = p["root_cert"].exists(), p["root_key"].exists()
    if any(root_present) and not all(root_present):
        raise AttestationError(f"{d}: root_ca.pem and root_ca.key must both exist or both be absent")
    if not any(root_present):
        if p["pck_cert"].exists():
            raise AttestationError(f"{d}: pck.pem exists without its root CA; remove it or restore root_ca.*")
        root_key = ec.generate_private_key(ec.SECP256R1())
        make("root_key", crypto.private_pem(root_key))
        make("root_cert", _ca_cert(root_key, now, party).public_bytes(serialization.Encoding.PEM))
    if not p["pck_cert"].exists():
        root_key = _load_key(p["root_key"])
        root_cert = x509.load_pem_x509_certificate(p["root_cert"].read_bytes())
        if p["pck_key"].exists():
            pck_key = _load_key(p["pck_key"])
        else:
            pck_key = ec.generate_private_key(ec.SECP256R1())
            make("pck_key", crypto.private_pem(pck_key))
        make(
            "pck_cert", _pck_cert(pck_key, root_key, root_cert, now).public_bytes(serialization.Encoding.PEM)
        )
    elif not p["pck_key"].exists():
        raise AttestationError(f"{d}: pck.pem exists without pck.key")
    if not p["attestation_key"].exists():
        make("attestation_key", crypto.private_pem(ec.generate_private_key(ec.SECP256R1())))
    if not p["signing_key"].exists():
        make("signing_key", crypto.private_pem(rsa.generate_private_key(public_exponent=3, key_size=3072)))
    if not p["sealing_key"].exists():
        make("sealing_key", os.urandom(32))
    dep = SimDeployment.load(d)
    dep.created = created
    return dep


class SimBackend:
    """Produces simulated quotes for one node identity (``kind == "sim"``)."""

    kind = "sim"

    def __init__(
        self, deployment: SimDeployment, *, mr_enclave: bytes, isv_prod_id: int, isv_svn: int, debug: bool,
        mr_signer: bytes | None = None,
    ) -> None:
        if len(mr_enclave) != 32:
            raise AttestationError("mr_enclave must be 32 bytes")
        self.deployment = deployment
        self.mr_enclave = mr_enclave
        # The deployment's simulated signing key, unless the node was signed (gramine-direct: the SIGSTRUCT's)
        self.mr_signer = mr_signer or deployment.mr_signer
        self.isv_prod_id = isv_prod_id
        self.isv_svn = isv_svn
        self.debug = debug

    @classmethod
    def for_node(cls, trust_dir: Path | str, *, manifest_toml: bytes, identity: Identity) -> SimBackend:
        """The backend of a node: mr_enclave computed from its own rendered manifest (and the installed code),
        isv values from its own pins entry. The caller has already checked plan/policy against the
        manifest."""
        dep = SimDeployment.load(trust_dir)
        return cls(
            dep,
            mr_enclave=bytes.fromhex(sim_mr_enclave(manifest_toml)),
            isv_prod_id=identity.isv_prod_id,
            isv_svn=identity.isv_svn_min,
            debug=identity.debug,
        )

    @classmethod
    def for_signed_node(
        cls, trust_dir: Path | str, *, signed_manifest: bytes, sigstruct: bytes
    ) -> SimBackend:
        """The backend of a signed node under gramine-direct, which has no /dev/attestation: it reports
        what SGX hardware would take from the SIGSTRUCT (checked like EINIT checks it: signer, ISV values,
        debug), except MRENCLAVE, which only the hardware can measure; in its place the simulated
        measurement of the manifest Gramine runs (fldsl.measurement.sim_mr_enclave_gramine)."""
        from fldsl.runtime.attestation.sigstruct import parse_sigstruct

        sig = parse_sigstruct(sigstruct)
        return cls(
            SimDeployment.load(trust_dir),
            mr_enclave=bytes.fromhex(sim_mr_enclave_gramine(signed_manifest)),
            isv_prod_id=sig.isv_prod_id,
            isv_svn=sig.isv_svn,
            debug=sig.debug,
            mr_signer=sig.mr_signer,
        )

    def quote(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise AttestationError(f"report_data must be exactly 64 bytes, got {len(report_data)}")
        dep = self.deployment
        att_pub = crypto.raw_public_p256(dep.attestation_key)
        qe_report = make_report_body(
            mr_enclave=SIM_QE_MR_ENCLAVE,
            mr_signer=dep.mr_signer,
            isv_prod_id=1,
            isv_svn=1,
            report_data=hashlib.sha256(att_pub + SIM_QE_AUTH_DATA).digest() + b"\0" * 32,
        )
        flags = FLAG_INIT | FLAG_MODE64BIT | (FLAG_DEBUG if self.debug else 0)
        body = make_report_body(
            mr_enclave=self.mr_enclave,
            mr_signer=self.mr_signer,
            isv_prod_id=self.isv_prod_id,
            isv_svn=self.isv_svn,
            report_data=report_data,
            attributes=flags,
        )
        chain = dep.pck_cert_pem + dep.root_cert_pem + b"\0"
        return build_quote(
            header=build_header(vendor_id=SIM_QE_VENDOR_ID, user_data=b"fldsl-sim"),
            body=body,
            sign=lambda data: crypto.sign_raw_p256(dep.attestation_key, data),
            attestation_key=att_pub,
            qe_report=qe_report,
            qe_report_signature=crypto.sign_raw_p256(dep.pck_key, qe_report.raw),
            qe_auth_data=SIM_QE_AUTH_DATA,
            cert_data=chain,
            cert_data_type=CERT_TYPE_PCK_CHAIN,
        )

    def sealing_key(self) -> bytes:
        # The deployment's key file, so the model owner can decrypt exports with `fldsl model decrypt`.
        return self.deployment.sealing_key

    def verify(self, quote: bytes) -> Verdict:
        return verify_sim_quote(quote, self.deployment.root_cert_pem)


def _fail(status: str, message: str) -> Verdict:
    return Verdict(ok=False, simulated=True, status=status, message=message)


def verify_sim_quote(
    quote: bytes | Quote, root_pem: bytes, *, now: dt.datetime | None = None,
    whose: str = "this deployment's",
) -> Verdict:
    """Check a simulated quote's whole chain against a sim root (``whose``: the words naming that root in
    messages, e.g. "party shop's"). Never raises on bad input."""
    try:
        q = quote if isinstance(quote, Quote) else Quote.parse(quote)
    except QuoteError as e:
        return _fail("malformed", f"malformed quote: {e}")
    if not q.is_simulated:
        return Verdict(False, False, "not-simulated", "not a simulated quote (vendor id is not fldsl's)")
    if q.cert_data_type != CERT_TYPE_PCK_CHAIN:
        return _fail("bad-cert-data", f"certification data type {q.cert_data_type}, expected 5 (PCK chain)")
    now = now or dt.datetime.now(dt.UTC)
    try:
        root = x509.load_pem_x509_certificate(root_pem)
        chain = x509.load_pem_x509_certificates(q.cert_data.rstrip(b"\0"))
    except ValueError as e:
        return _fail("bad-cert-data", f"unreadable certificate chain: {e}")
    # Exactly "PCK ‖ root ‖ NUL" in canonical PEM, as SimBackend writes it: nothing else rides along unsigned.
    canonical = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) + b"\0"
    if len(chain) != 2 or chain[1] != root or q.cert_data != canonical:
        return _fail(
            "untrusted-root" if len(chain) == 2 and chain[1] != root else "bad-cert-data",
            f"the quote's certification data is not 'PCK certificate, {whose} simulated root CA' "
            "(another party's or deployment's trust material, or a modified chain)",
        )
    pck = chain[0]
    try:
        pck.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError) as e:
        return _fail(
            "untrusted-root",
            f"the quote's PCK certificate is not signed by {whose} simulated root CA "
            f"({type(e).__name__}); the peer uses another party's or deployment's trust material",
        )
    for cert, what in ((root, "root CA"), (pck, "PCK certificate")):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return _fail("expired", f"simulated {what} is not valid at {now:%Y-%m-%d %H:%M} UTC")
    pck_pub = pck.public_key()
    if not isinstance(pck_pub, ec.EllipticCurvePublicKey) or pck_pub.curve.name != "secp256r1":
        return _fail("bad-cert-data", "PCK key must be ECDSA P-256")
    if not crypto.verify_raw_with(pck_pub, q.qe_report_signature, q.qe_report.raw):
        return _fail("bad-signature", "QE report signature does not verify with the PCK key")
    expected_qe_rd = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + b"\0" * 32
    if q.qe_report.report_data != expected_qe_rd:
        return _fail("bad-qe-report", "QE report data does not bind the attestation key")
    if not crypto.verify_raw_p256(q.attestation_key, q.signature, q.signed_bytes):
        return _fail("bad-signature", "enclave report signature does not verify with the attestation key")
    return Verdict(True, True, "ok", f"simulated quote chain verified against {whose} sim root")
