"""``fldsl compile --sign KEY``: sign every node with Gramine and pin the real SGX identities.

On the deployment host (docs/trust.md, "Inside Gramine"), per node directory: fldsl renders the node's
template for the entrypoint interpreter (``fldsl.compiler.manifest.render_stage2``: that interpreter's
computed file list and
the installed Gramine's runtime), then, in a scratch folder where ``node/`` is the node directory::

    gramine-manifest X.rendered.toml node/X.manifest        (defaults, schema check, every file hashed)
    gramine-sgx-sign --key KEY --manifest node/X.manifest --output node/X.manifest.sgx --sigfile node/X.sig
    gramine-sgx-sigstruct-view --output-format json node/X.sig

then the real MRENCLAVE / MRSIGNER / isv values (and the simulated measurement of the signed manifest, what
the node reports under gramine-direct) replace the simulated ones in ``pins.json`` of EVERY node
(they must stay identical: peers compare pin-table digests) and in ``pipeline.json``. MRSIGNER is also
computed from the key itself (SHA-256 of the little-endian RSA-3072 modulus) and must agree with the tool's
output, so a wrong key or a tampered tool output is caught. All nodes are signed before anything is
written: a failure leaves the build directory as it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fldsl.artifacts import (
    ArtifactError,
    Identity,
    Pins,
    PipelineFile,
    Policy,
    dump_json,
    load_model,
    sha256_hex,
)
from fldsl.compiler.enclave_files import (
    EnclaveFiles,
    EnclaveFilesError,
    enclave_files,
    with_dcap_verification,
)
from fldsl.compiler.pycache import PYCACHE_DIR, PycacheError, build_pycache
from fldsl.measurement import mr_signer_of, sim_mr_enclave_gramine

TOOLS = ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx-sigstruct-view")
TOOL_TIMEOUT_S = 600


class SignError(Exception):
    """Signing failed; ``str()`` is user-facing. ``exit_code`` follows fldsl/cli (2 input, 4 environment)."""

    exit_code = 2


class GramineMissing(SignError):
    exit_code = 4


@dataclass(frozen=True)
class SignedNode:
    node_id: str
    mr_enclave: str
    mr_signer: str
    isv_prod_id: int
    isv_svn: int
    debug: bool
    sim_mr_enclave: str  # what this node reports under gramine-direct (simulated quotes)
    trusted_files: int = 0  # entries of sgx.trusted_files in the signed manifest


def load_signing_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise SignError(
            f"{path}: signing key not found (create one with gramine-sgx-gen-private-key)"
        ) from None
    except (ValueError, TypeError) as e:
        raise SignError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if (
        not isinstance(key, rsa.RSAPrivateKey)
        or key.key_size != 3072
        or key.public_key().public_numbers().e != 3
    ):
        raise SignError(f"{path}: SGX enclave signing keys must be RSA-3072 with public exponent 3")
    return key


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except OSError as e:
        raise GramineMissing(f"cannot run {cmd[0]}: {e}") from None
    except subprocess.TimeoutExpired:
        raise SignError(f"{cmd[0]} did not finish within {TOOL_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SignError(
            f"{' '.join(cmd[:1])} failed in {cwd} (exit {proc.returncode}): " + " | ".join(detail)
        )
    return proc.stdout


def _parse_sigstruct_view(text: str, sig: Path) -> dict[str, object]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SignError(f"gramine-sgx-sigstruct-view printed no JSON for {sig}: {e}") from None
    if not isinstance(doc, dict):
        raise SignError(f"gramine-sgx-sigstruct-view: unexpected output for {sig}")
    out: dict[str, object] = {}
    for field in ("mr_enclave", "mr_signer"):
        value = doc.get(field)
        if not (
            isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)
        ):
            raise SignError(f"gramine-sgx-sigstruct-view: {field} missing or not 64 hex digits for {sig}")
        out[field] = value.lower()
    for field in ("isv_prod_id", "isv_svn"):
        value = doc.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
            raise SignError(f"gramine-sgx-sigstruct-view: {field} missing or out of range for {sig}")
        out[field] = value
    debug = doc.get("debug_enclave")
    if not isinstance(debug, bool):
        raise SignError(f"gramine-sgx-sigstruct-view: debug_enclave missing for {sig}")
    out["debug"] = debug
    return out


def _local_arch_libdir() -> str:
    from fldsl.compiler.manifest import local_arch_libdir

    return local_arch_libdir()


def gramine_pkglibdir() -> str:
    """The library folder of the Gramine on PATH, as gramine-manifest itself reports it."""
    text = _run(["gramine-manifest", "--no-check", "-c", 'libos.entrypoint = "{{ gramine.pkglibdir }}"'],
                Path.cwd())
    try:
        value = tomllib.loads(text)["libos"]["entrypoint"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise SignError(f"gramine-manifest did not report its library folder: {e}") from None
    if not isinstance(value, str) or not value.startswith("/"):
        raise SignError(f"gramine-manifest reported an odd library folder: {value!r}")
    return value


def _attestation_mode(node_dir: Path) -> str:
    try:
        return load_model(Policy, node_dir / "policy.json").attestation.mode
    except ArtifactError as e:
        raise SignError(str(e)) from None


def sign_node(
    node_dir: Path, key: Path, *, files: EnclaveFiles, pkglibdir: str, arch_libdir: str,
    expected_mr_signer: str, qvl_library: str | None = None,
) -> SignedNode:
    """Render, hash, sign one node; leaves <stem>.manifest, <stem>.manifest.sgx and <stem>.sig in node_dir."""
    from fldsl.compiler.manifest import ManifestError, render_stage2

    node_id = node_dir.name
    templates = sorted(node_dir.glob("*.manifest.template"))
    if len(templates) != 1:
        found = ", ".join(t.name for t in templates) or "none"
        raise SignError(
            f"{node_dir}: expected one *.manifest.template, found {found} (was the pipeline compiled?)"
        )
    template = templates[0]
    stem = template.name.removesuffix(".manifest.template")  # e.g. "trainer" for node media.trainer
    try:
        rendered = render_stage2(template.read_text(), files, gramine_pkglibdir=pkglibdir,
                                 arch_libdir=arch_libdir, qvl_library=qvl_library)
    except ManifestError as e:
        raise SignError(f"{node_id}: {e}") from None
    # The manifest's host URIs are relative to the node's working folder (node/plan.json, ...): run the
    # tools in a scratch folder laid out the same way.
    with tempfile.TemporaryDirectory(prefix="fldsl-sign-") as scratch:
        work = Path(scratch)
        (work / "node").symlink_to(node_dir.resolve(), target_is_directory=True)
        (work / PYCACHE_DIR).symlink_to((node_dir / ".." / ".." / PYCACHE_DIR).resolve(),
                                        target_is_directory=True)
        (work / f"{stem}.rendered.toml").write_text(rendered)
        _run(["gramine-manifest", f"{stem}.rendered.toml", f"node/{stem}.manifest"], work)
        _run(
            [
                "gramine-sgx-sign", "--key", str(Path(key).resolve()),
                "--manifest", f"node/{stem}.manifest",
                "--output", f"node/{stem}.manifest.sgx",
                "--sigfile", f"node/{stem}.sig",
            ],
            work,
        )
        view = _parse_sigstruct_view(
            _run(["gramine-sgx-sigstruct-view", "--output-format", "json", f"node/{stem}.sig"], work),
            node_dir / f"{stem}.sig",
        )
    signed_manifest = (node_dir / f"{stem}.manifest").read_bytes()
    if view["mr_signer"] != expected_mr_signer:
        raise SignError(
            f"{node_dir / (stem + '.sig')}: MRSIGNER {view['mr_signer']} from gramine-sgx-sigstruct-view "
            f"does not match {expected_mr_signer} computed from {key} — signed with another key?"
        )
    return SignedNode(
        node_id=node_id,
        mr_enclave=str(view["mr_enclave"]),
        mr_signer=str(view["mr_signer"]),
        isv_prod_id=int(view["isv_prod_id"]),  # type: ignore[call-overload]
        isv_svn=int(view["isv_svn"]),  # type: ignore[call-overload]
        debug=bool(view["debug"]),
        sim_mr_enclave=sim_mr_enclave_gramine(signed_manifest),
        trusted_files=len(tomllib.loads(signed_manifest.decode()).get("sgx", {}).get("trusted_files", [])),
    )


def sign_build(
    build_dir: Path, key: Path, *, entrypoint: str | None = None, arch_libdir: str | None = None
) -> list[SignedNode]:
    """Sign every node of a build directory and pin the real identities (see module docstring)."""
    build_dir = Path(build_dir)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise GramineMissing(
            f"--sign needs Gramine's tools on PATH ({', '.join(missing)} not found). Install Gramine v1.9 on "
            "the SGX deployment host and sign there; without it, nodes keep their simulated measurements."
        )
    signing_key = load_signing_key(key)
    mr_signer = mr_signer_of(signing_key).hex()
    node_dirs, pins, pipeline = _load_build(build_dir)
    entry = entrypoint or sys.executable
    libdir = arch_libdir or _local_arch_libdir()
    qvl: str | None = None
    try:
        files = enclave_files(entry)
        if _attestation_mode(node_dirs[0]) == "dcap":
            files, qvl = with_dcap_verification(files)
        pycache = build_pycache(entry, files.trusted, build_dir / PYCACHE_DIR)
    except (EnclaveFilesError, PycacheError) as e:
        raise SignError(str(e)) from None
    files = files.model_copy(update={"pycache": pycache})
    pkglibdir = gramine_pkglibdir()
    signed: list[SignedNode] = []
    for d in node_dirs:
        if d.name not in pins.nodes:
            raise SignError(f"{d}: node {d.name!r} is not in pins.json")
        s = sign_node(d, key, files=files, pkglibdir=pkglibdir, arch_libdir=libdir,
                      expected_mr_signer=mr_signer, qvl_library=qvl)
        _check_sigstruct(s, pins.nodes[d.name], d.name)
        signed.append(s)
    _pin_signed(build_dir, node_dirs, pins, pipeline, signed)
    return signed


def _load_build(build_dir: Path) -> tuple[list[Path], Pins, PipelineFile]:
    """The build's node folders, their (identical) pins and pipeline.json."""
    nodes_root = build_dir / "nodes"
    node_dirs = sorted(p for p in nodes_root.iterdir() if p.is_dir()) if nodes_root.is_dir() else []
    if not node_dirs:
        raise SignError(f"{build_dir}: no node directories under nodes/ (was the pipeline compiled?)")
    try:
        pins = load_model(Pins, node_dirs[0] / "pins.json")
        pipeline = load_model(PipelineFile, build_dir / "pipeline.json")
    except ArtifactError as e:
        raise SignError(str(e)) from None
    for d in node_dirs[1:]:
        try:
            other = load_model(Pins, d / "pins.json")
        except ArtifactError as e:
            raise SignError(str(e)) from None
        if other != pins:
            raise SignError(f"{d / 'pins.json'} differs from {node_dirs[0] / 'pins.json'}; recompile first")
    return node_dirs, pins, pipeline


def _check_sigstruct(s: SignedNode, compiled: Identity, name: str) -> None:
    """The signed enclave carries the identity the trust block pinned (else the build is not signed)."""
    if s.isv_prod_id != compiled.isv_prod_id:
        raise SignError(
            f"{name}: SIGSTRUCT isv_prod_id {s.isv_prod_id} != {compiled.isv_prod_id} "
            "from the trust block"
        )
    if s.isv_svn < compiled.isv_svn_min:
        raise SignError(
            f"{name}: SIGSTRUCT isv_svn {s.isv_svn} is below the pinned minimum {compiled.isv_svn_min}"
        )
    if s.debug != compiled.debug:
        raise SignError(
            f"{name}: SIGSTRUCT debug={s.debug} but the trust block says debug={compiled.debug}"
        )


def _pin_signed(
    build_dir: Path, node_dirs: list[Path], pins: Pins, pipeline: PipelineFile, signed: list[SignedNode]
) -> None:
    # Everything signed: now rewrite pins (identical in every node) and pipeline.json.
    for s in signed:
        pins.nodes[s.node_id] = Identity(
            mr_enclave=[s.mr_enclave],
            mr_signer=s.mr_signer,
            isv_prod_id=s.isv_prod_id,
            isv_svn_min=pins.nodes[s.node_id].isv_svn_min,
            debug=s.debug,
            measurement_kind="sgx",
            sim_mr_enclave=s.sim_mr_enclave,
        )
    pins_text = dump_json(pins)
    by_id = {s.node_id: s for s in signed}
    for summary in pipeline.nodes:
        if summary.id in by_id:
            summary.measurement = by_id[summary.id].mr_enclave
            summary.measurement_kind = "sgx"
            for rel in summary.files:
                if rel == "pins.json" or rel.endswith("/pins.json"):
                    summary.files[rel] = sha256_hex(pins_text.encode())
    for d in node_dirs:
        (d / "pins.json").write_text(pins_text)
    (build_dir / "pipeline.json").write_text(dump_json(pipeline))
