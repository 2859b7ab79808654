"""Peer identity verification: is this RA-TLS certificate a node of our deployment, running our build?

:class:`PeerVerifier` runs, in order (first failure wins, so the operator sees the most basic problem):

1. certificate parses, is inside its validity window, and (an fldsl certificate) that window is at
   most ``MAX_CERT_VALIDITY`` (2 days) long                          → field ``certificate``
2. the evidence binds the certificate key (and it is self-signed) → field ``pubkey``
3. sim vs real: a simulated quote under ``attestation dcap``       → field ``attestation_mode``
4. the quote is genuine (Intel QVL, or a sim chain to the root that the party of the node the certificate
   claims to be published)                                          → field ``quote`` (``node``: no claim)
5. the certificate claims an fldsl node id                           → field ``node``
6. node id known in pins, equal to the expected one               → field ``node``
7. attested pins digest equals ours                               → field ``pins``
8. enclave attributes sane (INIT, MODE64BIT, no PROVISIONKEY)      → field ``attributes``
9. mr_enclave ∈ pinned list, mr_signer (if pinned), isv_prod_id exact, isv_svn ≥ min, debug
   refused unless both the requirement and the pinned identity allow it.

Every failure raises :class:`PeerRefused` with the field, the expected and actual values and a likely cause.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from fldsl.artifacts import AttestationRequirement, Identity, Pins
from fldsl.runtime.attestation import qvl
from fldsl.runtime.attestation.backend import Verdict
from fldsl.runtime.attestation.parties import party_of
from fldsl.runtime.attestation.quote import (
    FLAG_EINITTOKEN_KEY,
    FLAG_INIT,
    FLAG_MODE64BIT,
    FLAG_PROVISIONKEY,
    Quote,
)
from fldsl.runtime.attestation.ratls import MAX_CERT_VALIDITY, CertificateError, Evidence, parse_certificate
from fldsl.runtime.attestation.sim import verify_sim_quote

CAUSES = {
    "certificate": "the peer sent something that is not a valid, current fldsl RA-TLS certificate",
    "pubkey": "the quote does not attest this certificate's key — evidence copied from another certificate "
    "(a man-in-the-middle) or a corrupted certificate",
    "attestation_mode": "the pipeline requires real SGX (attestation dcap) but the peer runs the simulated "
    "backend — run it under gramine-sgx, or use `attestation sim` for development",
    "quote": "the quote is not genuine for this deployment",
    "node": "the peer is not the node we expected (wrong address, or a node of another pipeline)",
    "pins": "the peer's pins.json differs from ours — it was compiled separately or its host edited the "
    "pins; "
    "deploy the same build directory to every node",
    "attributes": "the enclave was launched with unsafe attributes",
    "mr_enclave": "the peer runs a different plan or code than was compiled — recompile and redeploy",
    "mr_signer": "the peer's enclave was signed with another key (another trust dir or signing key)",
    "isv_prod_id": "the peer's enclave is another product (isv_prod_id in the trust block differs)",
    "isv_svn": "the peer runs an older security version than the pipeline requires — update it",
    "debug": "debug enclaves expose their memory to the host; build with debug: false, or allow debug "
    "enclaves in the trust block (development only)",
}


class PeerRefused(Exception):
    """A peer failed verification. ``str()`` is a full user-facing message."""

    def __init__(self, field: str, expected: str, actual: str, message: str | None = None) -> None:
        self.field = field
        self.expected = expected
        self.actual = actual
        self.message = (
            message or f"{field}: expected {expected}, got {actual} ({CAUSES.get(field, 'refused')})"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class PeerVerdict:
    node_id: str
    identity: Identity
    simulated: bool
    summary: str
    evidence: Evidence
    quote_verdict: Verdict


def _refuse(who: str, field: str, expected: object, actual: object, detail: str | None = None) -> PeerRefused:
    cause = detail or CAUSES.get(field, "refused")
    msg = f"peer {who} refused: {field} expected {expected}, got {actual} — {cause}"
    return PeerRefused(field, str(expected), str(actual), msg)


def check_identity(
    quote: Quote, identity: Identity, requirement: AttestationRequirement, *, who: str = "?"
) -> None:
    """Steps 7–8: compare a (genuine) quote with a pinned identity. Raises PeerRefused."""
    flags = quote.attributes
    if (
        not flags & FLAG_INIT
        or not flags & FLAG_MODE64BIT
        or flags & (FLAG_PROVISIONKEY | FLAG_EINITTOKEN_KEY)
    ):
        raise _refuse(
            who, "attributes", "INIT|MODE64BIT set, PROVISIONKEY|EINITTOKEN_KEY clear", f"{flags:#x}"
        )
    if quote.is_simulated and identity.measurement_kind == "sgx":
        # A signed build under gramine-direct: its simulated quote carries the simulated measurement of
        # the signed manifest, pinned beside the real MRENCLAVE at sign time.
        pinned = [(identity.sim_mr_enclave or "").lower()]
    else:
        pinned = [m.lower() for m in identity.mr_enclave]
    actual = quote.mr_enclave.hex()
    if actual not in pinned:
        expected = pinned[0] if len(pinned) == 1 else "one of " + ", ".join(pinned)
        raise _refuse(who, "mr_enclave", expected, actual)
    if identity.mr_signer is not None and quote.mr_signer.hex() != identity.mr_signer.lower():
        raise _refuse(who, "mr_signer", identity.mr_signer.lower(), quote.mr_signer.hex())
    if quote.isv_prod_id != identity.isv_prod_id:
        raise _refuse(who, "isv_prod_id", identity.isv_prod_id, quote.isv_prod_id)
    if quote.isv_svn < identity.isv_svn_min:
        raise _refuse(who, "isv_svn", f">= {identity.isv_svn_min}", quote.isv_svn)
    if quote.debug and not (requirement.allow_debug and identity.debug):
        why = (
            "the policy does not allow debug enclaves"
            if not requirement.allow_debug
            else ("the pinned identity is not a debug build")
        )
        raise _refuse(
            who, "debug", "production enclave (DEBUG clear)", "DEBUG enclave", f"{why}; {CAUSES['debug']}"
        )


def _duration(delta: dt.timedelta) -> str:
    days = delta / dt.timedelta(days=1)
    return f"{days:g} days" if days >= 1 else f"{delta.total_seconds() / 3600:g} hours"


class PeerVerifier:
    """Verifies peers' RA-TLS certificates against the deployment's pins and this node's policy."""

    def __init__(
        self,
        pins: Pins,
        requirement: AttestationRequirement,
        *,
        sim_roots: Mapping[str, bytes] | None,
        own_pins_digest: bytes | str,
        now: dt.datetime | None = None,
        max_validity: dt.timedelta = MAX_CERT_VALIDITY,
    ) -> None:
        self.pins = pins
        self.requirement = requirement
        # {party: sim root PEM}: a sim quote of party P's node must chain to the root P published
        # (fldsl.runtime.attestation.parties); one party's keys cannot vouch for another's nodes.
        self.sim_roots = dict(sim_roots or {})
        own = bytes.fromhex(own_pins_digest) if isinstance(own_pins_digest, str) else bytes(own_pins_digest)
        self.own_pins_digest = own
        self._now = now
        self.max_validity = max_validity

    def _genuine(self, quote: Quote, who: str, party: str | None) -> Verdict:
        if quote.is_simulated:
            if party is None:
                raise _refuse(who, "node", "an fldsl node id claim", "no fldsl-node claim",
                              "a simulated quote is checked against the root of the party whose node the "
                              "certificate names, and this certificate names none")
            root = self.sim_roots.get(party)
            if root is None:
                known = ", ".join(sorted(self.sim_roots)) or "none"
                raise _refuse(
                    who,
                    "quote",
                    f"a simulated quote chaining to party {party}'s pinned root",
                    f"no identity of party {party} is pinned (pinned: {known})",
                    f"add party {party}'s public identity to this node's trust folder with `fldsl trust "
                    f"add-peer` (its file is {party}/identity.json on {party}'s host)",
                )
            verdict = verify_sim_quote(quote, root, now=self._time(), whose=f"party {party}'s")
        else:
            try:
                verdict = qvl.verify_dcap_quote(quote, now=self._time().timestamp())
            except qvl.QvlUnavailable as e:
                if not self.requirement.allow_unverified_real_quotes:
                    raise _refuse(
                        who,
                        "quote",
                        "a quote verified by Intel QVL",
                        "an unverifiable real SGX quote",
                        f"{e}; refusing (fail closed). For development only, the policy can "
                        "set allow_unverified_real_quotes",
                    ) from None
                verdict = Verdict(True, False, "unverified", f"UNVERIFIED real SGX quote: {e}")
        if not verdict.ok:
            raise _refuse(who, "quote", "a genuine quote", verdict.status, verdict.message)
        return verdict

    def _time(self) -> dt.datetime:
        return self._now or dt.datetime.now(dt.UTC)

    def _check_lifetime(self, ev: Evidence, who: str) -> None:
        """fldsl certificates are short-lived: a long-lived one would stay replayable evidence for years.

        Only certificates with an fldsl node claim are held to the ceiling: Gramine and the Intel SGX SDK mint
        theirs with fixed, decades-long windows (an enclave has no trusted clock), which ``fldsl inspect``
        still decodes and checks; without the claim the verifier refuses them at ``node`` anyway.
        """
        lifetime = ev.not_after - ev.not_before
        if ev.node_id is not None and lifetime > self.max_validity:
            ceiling = _duration(self.max_validity)
            raise _refuse(
                who,
                "certificate",
                f"a validity period of at most {ceiling}",
                f"{_duration(lifetime)} ({ev.not_before:%Y-%m-%d} to {ev.not_after:%Y-%m-%d})",
                f"the certificate is valid for longer than the ceiling of {ceiling}; fldsl nodes make "
                "certificates valid for 1 day, so this one was not made by an fldsl node of this version",
            )

    def verify(self, cert_pem: bytes | str, expect_node: str | None = None) -> PeerVerdict:
        who = expect_node or "?"
        try:
            ev = parse_certificate(cert_pem)
        except CertificateError as e:
            raise _refuse(who, "certificate", "a valid RA-TLS certificate", "malformed", str(e)) from None
        who = expect_node or ev.node_id or ev.subject_cn or "?"
        now = self._time()
        if not ev.not_before <= now <= ev.not_after:
            raise _refuse(
                who,
                "certificate",
                f"valid at {now:%Y-%m-%d %H:%M:%S} UTC",
                f"valid {ev.not_before:%Y-%m-%d %H:%M:%S} to {ev.not_after:%Y-%m-%d %H:%M:%S} UTC",
                "the certificate is outside its validity window (a replayed old certificate, or "
                "a wrong clock)",
            )
        self._check_lifetime(ev, who)
        if not ev.self_signature_ok:
            raise _refuse(
                who,
                "certificate",
                "a valid self-signature",
                "bad signature",
                "the certificate was modified after it was signed",
            )
        if not ev.pubkey_hash_ok:
            raise _refuse(
                who,
                "pubkey",
                "quote report data binding the certificate key",
                "no binding",
                f"{ev.binding_problem}; {CAUSES['pubkey']}",
            )
        quote = ev.quote
        if quote.is_simulated and self.requirement.mode == "dcap":
            raise _refuse(who, "attestation_mode", "real SGX (dcap)", "simulated quote")
        node = ev.node_id
        if node is not None and node not in self.pins.nodes:  # no party's root to check it against
            raise _refuse(who, "node", "one of " + ", ".join(sorted(self.pins.nodes)), node)
        # The claim only chooses whose root a sim quote must chain to; a false claim fails right there.
        verdict = self._genuine(quote, who, party_of(node) if node is not None else None)
        if node is None:
            raise _refuse(
                who,
                "node",
                expect_node or "an fldsl node id claim",
                "no fldsl-node claim",
                "the certificate was not made by an fldsl node",
            )
        if node not in self.pins.nodes:
            raise _refuse(who, "node", "one of " + ", ".join(sorted(self.pins.nodes)), node)
        if expect_node is not None and node != expect_node:
            raise _refuse(who, "node", expect_node, node)
        if ev.pins_digest != self.own_pins_digest:
            actual = ev.pins_digest.hex() if ev.pins_digest is not None else "none"
            raise _refuse(node, "pins", self.own_pins_digest.hex(), actual)
        identity = self.pins.nodes[node]
        if quote.is_simulated and identity.measurement_kind == "sgx" and identity.sim_mr_enclave is None:
            # Signed, but without the simulated measurement of the signed manifest (what gramine-direct
            # reports): only real quotes can match.
            raise _refuse(
                node, "attestation_mode", "real SGX (pins hold real measurements)", "simulated quote"
            )
        check_identity(quote, identity, self.requirement, who=node)
        kind = (
            "SIMULATED"
            if quote.is_simulated
            else ("UNVERIFIED real SGX" if verdict.status == "unverified" else "SGX (Intel QVL verified)")
        )
        summary = (
            f"{node}: {kind} quote, mr_enclave {quote.mr_enclave.hex()[:16]}…, "
            f"isv_prod_id {quote.isv_prod_id}, "
            f"isv_svn {quote.isv_svn}{', DEBUG' if quote.debug else ''}"
        )
        return PeerVerdict(node, identity, quote.is_simulated, summary, ev, verdict)
