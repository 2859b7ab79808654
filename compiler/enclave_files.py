"""What a node's enclave trusts: the files of one Python interpreter running the fldsl runtime, and no more.

Gramine refuses to open any file that ``sgx.trusted_files`` (hash checked) or ``sgx.allowed_files`` does not
list. Trusting whole folders (``python.get_sys_path()``, ``{{ arch_libdir }}/``) is what Gramine's examples
do, but for a TensorFlow node it means ~80,000 files, a 17 MB manifest and a minute before Python runs,
and on merged-/usr systems every library twice. Instead the file list is computed:

- :mod:`fldsl.compiler.enclave_probe`, run inside the node's interpreter, lists the standard library, the
  distributions of fldsl's runtime dependency closure and fldsl's own code (see there);
- the shared libraries those need are the ``ldd`` closure of the interpreter and of every extension module,
  minus the libraries Gramine's own glibc runtime provides (mounted at ``/lib``).

Every path is listed once, by the name the dynamic loader and Python will open. The result is one
:class:`EnclaveFiles` per interpreter, used both for the compile-time rendering (the simulated measurement)
and for the rendering ``fldsl compile --sign`` hands to ``gramine-manifest``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict

# Provided by Gramine's runtime (runtime/glibc, mounted at /lib): never taken from the host.
GRAMINE_GLIBC = frozenset({
    "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libmvec.so.1", "libpthread.so.0", "libdl.so.2",
    "librt.so.1", "libresolv.so.2", "libutil.so.1", "libanl.so.1", "libnsl.so.1", "libnss_compat.so.2",
    "libnss_db.so.2", "libnss_dns.so.2", "libnss_files.so.2", "libthread_db.so.1",
})
LDD_BATCH = 64
PROBE_TIMEOUT_S = 120


class EnclaveFilesError(Exception):
    """The interpreter could not be probed; the message is meant for the user."""


class EnclaveFiles(BaseModel):
    """The host files one node's enclave needs, for one interpreter on one machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entrypoint: str  # the interpreter as invoked (a venv's bin/python3: Python finds pyvenv.cfg beside it)
    mounts: list[str]  # host folders and files mounted at the same path inside, parents first
    trusted: list[str]  # every file, sorted, each once
    allowed: list[str] = []  # host files read unmeasured (configuration the host legitimately owns)
    pycache: list[str] = []  # .pyc files under the build's pycache/ (fldsl.compiler.pycache; signed builds)
    distributions: list[str]  # "name==version" of the runtime's dependency closure (for the record)


def _run_probe(interpreter: str) -> dict[str, object]:
    try:
        proc = subprocess.run(
            [interpreter, "-I", "-m", "fldsl.compiler.enclave_probe"],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise EnclaveFilesError(f"cannot run {interpreter}: {e}") from None
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise EnclaveFilesError(
            f"{interpreter} cannot list the fldsl runtime's files (is fldsl installed in that environment?): "
            f"{tail}"
        )
    try:
        doc = json.loads(proc.stdout)
    except ValueError as e:
        raise EnclaveFilesError(f"{interpreter}: the file probe printed no JSON: {e}") from None
    if not isinstance(doc, dict):
        raise EnclaveFilesError(f"{interpreter}: unexpected probe output")
    return doc


def shared_library_closure(binaries: list[str]) -> list[str]:
    """Host libraries the binaries load (``ldd``), except Gramine's own glibc."""
    libs: set[str] = set()
    for i in range(0, len(binaries), LDD_BATCH):
        try:
            out = subprocess.run(["ldd", *binaries[i:i + LDD_BATCH]], capture_output=True, text=True,
                                 timeout=PROBE_TIMEOUT_S, check=False).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise EnclaveFilesError(f"cannot run ldd: {e}") from None
        for line in out.splitlines():
            if "=>" not in line:
                continue
            target = line.split("=>", 1)[1].split("(", 1)[0].strip()
            if target.startswith("/") and os.path.basename(target) not in GRAMINE_GLIBC:
                libs.add(target)
    return sorted(libs)


def _is_shared_object(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(".so") or ".so." in name


def _mount_roots(paths: list[str], pinned: list[str]) -> list[str]:
    """What the enclave mounts: the probe's entries (interpreter prefix, each runtime distribution's
    top-level entries in site-packages, fldsl's folders) plus the folder of every other trusted file
    (shared libraries), with entries inside another dropped, parents first."""
    roots = set(pinned)
    for p in paths:
        if not any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots):
            roots.add(str(PurePosixPath(p).parent))
    ordered = sorted(roots, key=lambda r: (r.count("/"), r))
    out: list[str] = []
    for r in ordered:
        if not any(r == o or r.startswith(o.rstrip("/") + "/") for o in out):
            out.append(r)
    return sorted(out, key=lambda r: (r.count("/"), r))


@functools.lru_cache(maxsize=4)
def enclave_files(interpreter: str) -> EnclaveFiles:
    """The files an fldsl node needs when run by ``interpreter`` (cached per process)."""
    doc = _run_probe(interpreter)
    files = [str(f) for f in _strings(doc.get("files", []))]
    entry = str(doc["executable"])
    real = str(doc["real_executable"])
    binaries = [real, *(f for f in files if _is_shared_object(f))]
    trusted = sorted(set(files) | set(shared_library_closure(binaries)) | {entry, real})
    return EnclaveFiles(
        entrypoint=entry,
        mounts=_mount_roots(trusted, _strings(doc.get("mounts", []))),
        trusted=trusted,
        distributions=_strings(doc.get("distributions", [])),
    )


def _strings(value: object) -> list[str]:
    """A JSON list of the probe's output as strings; anything else is a probe bug, said as one."""
    if not isinstance(value, list):
        raise ValueError(f"enclave probe: expected a list, got {type(value).__name__}")
    return [str(v) for v in value]


# What a node needs to verify real quotes (attestation dcap): Intel's QVL, the quote provider library it
# loads for collateral, their libraries, the CA bundle (PCCS over HTTPS) and the host's QCNL configuration
# (which PCCS to ask: a deployment setting, so read unmeasured).
QVL_SONAME = "libsgx_dcap_quoteverify.so.1"
QPL_SONAME = "libdcap_quoteprov.so.1"
QCNL_CONF = "/etc/sgx_default_qcnl.conf"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _ldconfig_path(soname: str) -> str | None:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" ")
        if name == soname and "=>" in rest and "x86-64" in rest:
            return rest.split("=>", 1)[1].strip()
    return None


def with_dcap_verification(files: EnclaveFiles) -> tuple[EnclaveFiles, str]:
    """``files`` plus what verifying DCAP quotes inside the enclave needs; returns them and the QVL path.
    Fails (closed) where the signing host has no QVL: such nodes could never accept a real peer."""
    qvl = _ldconfig_path(QVL_SONAME)
    if qvl is None:
        raise EnclaveFilesError(
            f"attestation dcap: nodes verify their peers' quotes with Intel's QVL, but {QVL_SONAME} is not "
            "installed on this host; install the DCAP packages (libsgx-dcap-quote-verify, "
            "libsgx-dcap-default-qpl) where you sign, or use `attestation sim` for development")
    libs = [qvl, *(p for p in [_ldconfig_path(QPL_SONAME)] if p)]
    extra = set(libs) | set(shared_library_closure(libs))
    if os.path.isfile(CA_BUNDLE):
        extra.add(CA_BUNDLE)
    trusted = sorted(set(files.trusted) | extra)
    allowed = sorted(set(files.allowed) | ({QCNL_CONF} if os.path.isfile(QCNL_CONF) else set()))
    mounts = _mount_roots(trusted + allowed, files.mounts)
    return files.model_copy(update={"trusted": trusted, "allowed": allowed, "mounts": mounts}), qvl
