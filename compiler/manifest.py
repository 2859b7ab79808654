"""Per-node Gramine v1.9 manifest: the template we ship and the same manifest rendered for a machine.

Two stages, so that every rendering of a node describes the same enclave:

1. fldsl's own jinja pass (delimiters ``<< >>`` / ``<% %>``, template ``templates/node.manifest.template.j2``)
   bakes one node's settings (argv, sizes, the sha256 of plan.json and policy.json) into a template. This
   is machine independent.
2. :func:`render_stage2` fills what depends on the machine the node runs on: the interpreter, Gramine's
   runtime folder and the computed list of files that interpreter needs (:mod:`fldsl.compiler.enclave_files`).
   ``fldsl compile`` renders it for a *reference* machine (:data:`PORTABLE_ENCLAVE`: no host's interpreter
   or files), so that every party compiling the same pipeline on its own machine gets the same bytes and
   digest (``<node>.manifest.toml``: its bytes, with the installed fldsl code, are the node's simulated
   measurement when it runs without an enclave). ``fldsl compile --sign`` renders it for the entrypoint
   and gives the result to ``gramine-manifest`` (defaults, schema check, file hashes) and
   ``gramine-sgx-sign`` (``compiler/sign.py``): an enclave's files are its measurement, so a signed build
   is the signing machine's (under SGX every party runs the same image).

Paths inside the enclave are fixed (``/fldsl/node``, ``/fldsl/run``, ...); on the host every URI is relative
to the node's working folder, so a build can be moved and signed anywhere.

The runtime reads the rendered TOML back with :func:`fldsl.trusted_files.trusted_node_files`, the reader
this module's :func:`trusted_node_files` wraps (pure ``tomllib``).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import sysconfig
import tomllib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from fldsl.compiler.enclave_files import EnclaveFiles
from fldsl.compiler.manifest_check import LintContext
from fldsl.trusted_files import NODE_DIR_URI, TrustedFilesError
from fldsl.trusted_files import PLAIN_FILE_NAME as _FILE_NAME
from fldsl.trusted_files import SHA256_HEX as _SHA256
from fldsl.trusted_files import trusted_node_files as _read_trusted

# Where the Debian/Ubuntu Gramine package puts its glibc runtime. The local rendering uses this fixed value
# (a lookup would make the compile output depend on whether Gramine happens to be installed); --sign asks
# the installed Gramine.
LOCAL_GRAMINE_PKGLIBDIR = "/usr/lib/x86_64-linux-gnu/gramine"

_TEMPLATE = "node.manifest.template.j2"
_NODE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PIPELINE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ManifestError(Exception):
    """A manifest could not be rendered or read back; the message is meant for the user."""


def _no_jinja(value: str) -> str:
    # Values are pasted into a template that Gramine renders again; a "{{" in them would be executed there.
    if any(tok in value for tok in ("{{", "{%", "{#", "<<", "<%")):
        raise ValueError("must not contain template delimiters")
    return value


class TrustedFile(BaseModel):
    """A file the enclave reads only if it hashes to ``sha256`` (``None``: hashed at sign time)."""

    model_config = ConfigDict(extra="forbid")

    uri: str  # e.g. "file:/fldsl/node/plan.json"
    sha256: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.startswith("file:") or '"' in v or "\\" in v or "\n" in v:
            raise ValueError(f"trusted file uri must be a plain `file:` uri, got {v!r}")
        return _no_jinja(v)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256.match(v):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return v


class ManifestInputs(BaseModel):
    """Everything about one node that its manifest depends on."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str
    node_id: str  # "media.trainer"
    enclave_size: str = "8G"
    max_threads: int = 64
    isv_prod_id: int = 0
    isv_svn: int = 0
    debug: bool = False
    edmm: bool = False
    remote_attestation: Literal["dcap", "none"] = "dcap"
    log_level: str = "error"
    node_files: list[TrustedFile]  # plan.json / policy.json (with sha256): measured
    intra_op_threads: int = 2
    inter_op_threads: int = 2
    outputs_encrypted: bool = True  # at_rest encrypted (fldsl seals outputs itself; see the template)
    # How long the node waits for its peers: starting Python + TensorFlow inside an enclave takes a minute.
    connect_timeout_s: int = 900
    # The other parties whose nodes it talks to: their public identities, pinned in its party's trust folder
    # (trust/peers/<party>.json), are what their simulated quotes must chain to.
    peer_parties: list[str] = []

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        if not _NODE_ID.match(v):
            raise ValueError(f"node id must look like `party.node`, got {v!r}")
        return v

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, v: str) -> str:
        if not _PIPELINE.match(v):
            raise ValueError(f"pipeline name must be letters, digits, `_`, `.` or `-`, got {v!r}")
        return v

    @field_validator("enclave_size", "log_level")
    @classmethod
    def _plain(cls, v: str) -> str:
        # Format and range are the validator's job (it reports them as findings); here only what would
        # break the template itself is refused.
        return _no_jinja(v)


class RenderedManifest(BaseModel):
    template: str  # Gramine .manifest.template (for gramine-manifest on the deployment host)
    toml: str  # the same manifest rendered for this machine; its bytes are the simulated measurement


def node_file_uri(name: str) -> str:
    """The trusted uri of a file of the node's build folder, e.g. ``plan.json``."""
    if not _FILE_NAME.match(name):
        raise ManifestError(f"not a plain file name: {name!r}")
    return NODE_DIR_URI + name


# ---------------------------------------------------------------------------------------------------------
# Stage 1: fldsl's template → Gramine template
# ---------------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    """A scalar as a TOML value (JSON string escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _trusted_entry(f: TrustedFile) -> str:
    if f.sha256 is None:
        return _toml_value(f.uri)
    return f"{{ uri = {_toml_value(f.uri)}, sha256 = {_toml_value(f.sha256)} }}"


@functools.lru_cache(maxsize=1)
def _stage1_env() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fldsl.compiler", "templates"),
        block_start_string="<%",
        block_end_string="%>",
        variable_start_string="<<",
        variable_end_string=">>",
        comment_start_string="<#",
        comment_end_string="#>",
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["toml"] = _toml_value
    env.filters["trusted_entry"] = _trusted_entry
    return env


# A party's simulated trust folder (fldsl trust init --party), readable by its nodes under gramine-direct:
# its own material, its public identity and the peers it pins (a folder). The runtime's names are
# fldsl.runtime.attestation.sim.FILES and .parties (the compiler does not import the runtime; a test keeps
# them equal).
SIM_TRUST_FILES = ("attestation.key", "enclave_signing.key", "identity.json", "pck.key", "pck.pem",
                   "root_ca.key", "root_ca.pem", "sealing.key")


def render_template(inputs: ManifestInputs) -> str:
    """The Gramine ``.manifest.template`` of one node."""
    ctx = inputs.model_dump()
    ctx["sim_trust_files"] = SIM_TRUST_FILES
    # Sorted so the manifest does not depend on the order the caller listed the files in.
    ctx["node_files"] = sorted(inputs.node_files, key=lambda f: f.uri)
    return str(_stage1_env().get_template(_TEMPLATE).render(**ctx))


# ---------------------------------------------------------------------------------------------------------
# Stage 2 (local): what gramine-manifest would produce on this machine
# ---------------------------------------------------------------------------------------------------------


class _Gramine:
    """The ``gramine`` jinja global of gramine-manifest, for the Gramine installed in ``pkglibdir``."""

    def __init__(self, pkglibdir: str) -> None:
        self.pkglibdir = pkglibdir
        self.libos = f"{pkglibdir}/libsysdb.so"

    def runtimedir(self, libc: str = "glibc") -> str:
        return f"{self.pkglibdir}/runtime/{libc}"


def local_arch_libdir() -> str:
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return f"/lib/{multiarch}"


def render_stage2(
    template: str,
    enclave: EnclaveFiles,
    *,
    gramine_pkglibdir: str = LOCAL_GRAMINE_PKGLIBDIR,
    arch_libdir: str | None = None,
    qvl_library: str | None = None,
) -> str:
    """Stage 2: a node's template rendered for one machine (its interpreter's files, its Gramine). The one
    renderer of node manifests: ``fldsl compile`` uses it for this machine, ``--sign`` for the entrypoint
    and hands the result to gramine-manifest, so both describe the same enclave."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["toml"] = _toml_value
    try:
        text = env.from_string(template).render(
            entrypoint=enclave.entrypoint,
            arch_libdir=arch_libdir or local_arch_libdir(),
            gramine=_Gramine(gramine_pkglibdir),
            enclave=enclave,
            qvl_library=qvl_library,
        )
    except jinja2.TemplateError as e:
        raise ManifestError(f"manifest template does not render: {e}") from e
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # a bug in the template, not a user error; say where anyway
        raise ManifestError(f"rendered manifest is not valid TOML: {e}") from e
    return text


def render_local(template: str, interpreter: str | None = None) -> str:
    """The template rendered for this machine's interpreter (what the simulated measurement covers)."""
    from fldsl.compiler.enclave_files import EnclaveFilesError, enclave_files

    try:
        files = enclave_files(interpreter or sys.executable)
    except EnclaveFilesError as e:
        raise ManifestError(str(e)) from e
    return render_stage2(template, files)


# The reference machine an unsigned build's manifest is rendered for: a system Python and Gramine at their
# Debian paths, only the interpreter listed. What a node does is fixed by the template (argv, plan and
# policy hashes, thread caps) and the fldsl code, which the simulated measurement covers; which
# interpreter a party installed where is not, or two parties compiling on their own machines would never
# agree on a digest.
PORTABLE_ENCLAVE = EnclaveFiles(entrypoint="/usr/bin/python3", mounts=["/lib/x86_64-linux-gnu", "/usr"],
                                trusted=["/usr/bin/python3"], distributions=[])
PORTABLE_ARCH_LIBDIR = "/lib/x86_64-linux-gnu"


def render_portable(template: str) -> str:
    """The template rendered for :data:`PORTABLE_ENCLAVE`: the same bytes on every machine."""
    return render_stage2(template, PORTABLE_ENCLAVE, gramine_pkglibdir=LOCAL_GRAMINE_PKGLIBDIR,
                         arch_libdir=PORTABLE_ARCH_LIBDIR)


def render_node_manifest(inputs: ManifestInputs) -> RenderedManifest:
    """The node's Gramine template and the same manifest rendered for the reference machine (byte-identical
    on any machine; ``--sign`` renders the template again for the enclave's real interpreter)."""
    template = render_template(inputs)
    return RenderedManifest(template=template, toml=render_portable(template))


def lint_context_for(inputs: ManifestInputs) -> LintContext:
    """The production lint context matching what :func:`render_node_manifest` was asked to render."""
    return LintContext(
        production=True,
        debug_allowed=inputs.debug,
        required_trusted=sorted(f.uri for f in inputs.node_files),
        at_rest_encrypted=inputs.outputs_encrypted,
        # Outputs are sealed by the node (fldsl.runtime.sealing) before they reach run/, not by a Gramine
        # encrypted mount: the mount's MRENCLAVE key does not exist under gramine-direct.
        output_paths=[],
        output_dirs=[f"file:run/checkpoints/{inputs.node_id}/", "file:run/models/",
                     f"file:run/tensorboard/{inputs.node_id}/", f"file:run/audit/{inputs.node_id}/"],
    )


# ---------------------------------------------------------------------------------------------------------
# Reading back (the runtime)
# ---------------------------------------------------------------------------------------------------------


def trusted_node_files(toml_text: str) -> dict[str, str]:
    """File name → sha256 of every measured file of the node's build folder listed in a rendered manifest
    (the node's own reader, :func:`fldsl.trusted_files.trusted_node_files`, with the compiler's error)."""
    try:
        return _read_trusted(toml_text)
    except TrustedFilesError as e:
        raise ManifestError(str(e)) from e
