"""Simulated enclave measurement: what the compiler pins and what a sim-attested node reports.

Real MRENCLAVE is a hash over the enclave's pages and the signed manifest (Intel SDM vol. 3D,
"ECREATE/EADD/EEXTEND") and can only be computed on the deployment host by ``gramine-sgx-sign``. Without SGX
we compute a *simulated* measurement with the same coverage that matters for trust:

    mr_enclave_sim = SHA-256( "fldsl-sim-mrenclave/1\\0"
                              ‖ canonical bytes of the node's rendered manifest (.manifest.toml)
                              ‖ "\\0" ‖ code digest )

The rendered manifest lists ``plan.json`` and ``policy.json`` in ``sgx.trusted_files`` *with their sha256*
(as Gramine's ``.manifest.sgx`` does), so changing the plan or the policy changes the measurement, and the
code digest covers every file of the installed ``fldsl`` package (runtime, stdlib, ...). The compiler and
the sim attestation backend both call :func:`sim_mr_enclave`, so the pinned value and the reported value
can only agree when the node runs exactly the compiled plan with exactly the compiled code.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

SIM_DOMAIN = b"fldsl-sim-mrenclave/1\0"
SIM_GRAMINE_DOMAIN = b"fldsl-sim-mrenclave/gramine/1\0"
# Files of the installed package that make up "the code" of a node.
CODE_SUFFIXES = (".py", ".lark", ".j2", ".flp", ".proto")


# Folders under fldsl/ that are not fldsl's own modules: in a wheel, the sub-packages installed there (walked
# under their own names) and the bench; in a checkout, the links to the top-level folders (setup.py).
_NOT_FLDSL_ROOT = frozenset({"compiler", "runtime", "stdlib", "grammar", "pipelines", "bench"})


def package_root() -> Path:
    import fldsl

    return Path(fldsl.__file__).resolve().parent


def _package_dirs() -> list[tuple[str, Path]]:
    """The folders mapped into ``fldsl.*`` (works for editable and regular installs alike)."""
    import importlib

    out = []
    packages = (
        "fldsl", "fldsl.compiler", "fldsl.runtime", "fldsl.stdlib", "fldsl.grammar", "fldsl.pipelines",
    )
    for name in packages:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if mod.__file__ is not None:  # a namespace package has none: nothing of ours to measure
            out.append((name, Path(mod.__file__).resolve().parent))
    return out


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over (package-relative path, sha256(content)) of every code file, sorted by path."""
    entries: list[tuple[str, str]] = []
    for name, root in _package_dirs():
        for f in sorted(root.rglob("*")):
            if not f.is_file() or f.suffix not in CODE_SUFFIXES or "__pycache__" in f.parts:
                continue
            # Sub-packages are walked under their own name; count each file once, under the deepest
            # package name that owns it, and the bench (fldsl.bench) never: it is not a node's code.
            rel = f.relative_to(root).as_posix()
            if name == "fldsl" and f.relative_to(root).parts[0] in _NOT_FLDSL_ROOT:
                continue
            entries.append((f"{name}:{rel}", hashlib.sha256(f.read_bytes()).hexdigest()))
    h = hashlib.sha256()
    for rel, digest in sorted(set(entries)):
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def sim_mr_enclave(manifest_toml: bytes, code: str | None = None) -> str:
    """The simulated MRENCLAVE (hex) of a node from its rendered manifest bytes."""
    h = hashlib.sha256(SIM_DOMAIN)
    h.update(manifest_toml)
    h.update(b"\0")
    h.update((code or code_digest()).encode())
    return h.hexdigest()


def sim_mr_enclave_gramine(signed_manifest: bytes) -> str:
    """The simulated MRENCLAVE (hex) of a signed node running under ``gramine-direct``.

    The manifest gramine-manifest wrote lists every trusted file with its sha256 (interpreter, libraries,
    fldsl's code, plan and policy), and gramine-direct refuses any file whose content differs, so a hash of
    the manifest alone covers the code: no separate code digest. The real MRENCLAVE (what gramine-sgx
    reports) is computed by gramine-sgx-sign from the same file and pinned beside it."""
    return hashlib.sha256(SIM_GRAMINE_DOMAIN + signed_manifest).hexdigest()


def mr_signer_of(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> bytes:
    """MRSIGNER = SHA-256 of the 384-byte little-endian RSA-3072 modulus of the enclave signing key (what
    ``gramine-sgx-sign`` reports and SGX puts in every report): pinned by the compiler (``--sign``) and
    reported by the sim backend, so it lives here, with MRENCLAVE."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    if pub.key_size != 3072:
        raise ValueError(f"enclave signing key must be RSA-3072, got RSA-{pub.key_size}")
    return hashlib.sha256(pub.public_numbers().n.to_bytes(384, "little")).digest()
