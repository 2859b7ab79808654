"""Per-node Gramine v1.9 manifest: the template we ship and the same manifest rendered for this machine.

Two stages, so the template and the rendered TOML can never describe different enclaves:

1. fldsl's own jinja pass (delimiters ``<< >>`` / ``<% %>``, template ``templates/node.manifest.template.j2``)
   bakes one node's settings (argv, sizes, the sha256 of plan.json and policy.json) into a Gramine
   ``.manifest.template``. What is left for Gramine is machine-specific: ``{{ entrypoint }}``,
   ``{{ arch_libdir }}``, ``{{ gramine.runtimedir() }}`` and ``python.get_sys_path(entrypoint)``.
2. That template is rendered again either by ``gramine-manifest`` on the deployment host, or here by
   :func:`render_local`, which fills Gramine's jinja globals from *this* Python (reference/gramine.md §1.1).
   The local TOML's bytes are the node's simulated measurement (``fldsl.measurement.sim_mr_enclave``).

The runtime reads the rendered TOML back with :func:`trusted_node_files` (pure ``tomllib``; importing this
module does not import the parser or TensorFlow).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import PurePosixPath
from typing import Any, Literal

from fldsl.compiler.manifest_check import LintContext
from pydantic import BaseModel, ConfigDict, field_validator

# Host folder the deployment puts this node's build folder in; the trusted uris of plan.json / policy.json
# live under it and the runtime finds them by this prefix (keep it stable: it is part of the measurement).
NODE_DIR_URI = "file:/fldsl/node/"
# Paths inside the enclave (see the template's header comment).
OUTPUT_PATHS = ("/sealed",)
DATA_PATH = "/data"
ADDRESSES_URI = "file:/fldsl/run/addresses.json"
PINS_URI = NODE_DIR_URI + "pins.json"

# Where the Debian/Ubuntu Gramine package puts its glibc runtime. Gramine is not installed where fldsl
# compiles, so the local rendering uses this fixed value (a machine-dependent lookup would make the
# measurement depend on whether Gramine happens to be installed).
LOCAL_GRAMINE_PKGLIBDIR = "/usr/lib/x86_64-linux-gnu/gramine"

_TEMPLATE = "node.manifest.template.j2"
_NODE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PIPELINE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


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
    outputs_encrypted: bool = True  # at_rest encrypted

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


def render_template(inputs: ManifestInputs) -> str:
    """The Gramine ``.manifest.template`` of one node."""
    ctx = inputs.model_dump()
    # Sorted so the manifest does not depend on the order the caller listed the files in.
    ctx["node_files"] = sorted(inputs.node_files, key=lambda f: f.uri)
    return _stage1_env().get_template(_TEMPLATE).render(**ctx)


# ---------------------------------------------------------------------------------------------------------
# Stage 2 (local): what gramine-manifest would produce on this machine
# ---------------------------------------------------------------------------------------------------------


class _LocalGramine:
    """The ``gramine`` jinja global of gramine-manifest, for a Gramine installed in the default place."""

    pkglibdir = LOCAL_GRAMINE_PKGLIBDIR
    libos = f"{LOCAL_GRAMINE_PKGLIBDIR}/libsysdb.so"

    def runtimedir(self, libc: str = "glibc") -> str:
        return f"{LOCAL_GRAMINE_PKGLIBDIR}/runtime/{libc}"


@functools.lru_cache(maxsize=4)
def _interpreter_sys_path(interpreter: str) -> tuple[str, ...]:
    # Asked of a fresh isolated interpreter (as gramine-manifest does), not of this process: pytest and
    # other hosts prepend their own entries to sys.path, which must not leak into the measurement.
    try:
        out = subprocess.run(
            [interpreter, "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        entries = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise ManifestError(f"could not ask {interpreter} for its sys.path: {e}") from e
    return tuple(str(p) for p in entries if isinstance(p, str) and p)


def _fldsl_source_dirs() -> list[str]:
    """fldsl's own folders (an editable install imports from them though they are not on sys.path)."""
    from fldsl.measurement import _package_dirs

    return sorted({str(path) for _name, path in _package_dirs()})


def local_sys_path(interpreter: str) -> list[PurePosixPath]:
    """``python.get_sys_path(interpreter)`` as gramine-manifest computes it, plus fldsl's source folders
    when they lie outside every sys.path entry (editable installs), so the code the node runs is covered.
    Only existing paths; order as the interpreter reports it, then the source folders sorted."""
    seen: list[str] = []
    for p in _interpreter_sys_path(interpreter):
        if os.path.exists(p) and p not in seen:
            seen.append(p)
    for d in _fldsl_source_dirs():
        if not any(d == s or d.startswith(s.rstrip("/") + "/") for s in seen):
            seen.append(d)
    return [_SysPathEntry(p) for p in seen]


class _SysPathEntry(PurePosixPath):
    """A path that answers ``is_dir()`` like gramine-manifest's ``pathlib.Path`` entries do."""

    def is_dir(self) -> bool:
        return os.path.isdir(str(self))


class _LocalPython:
    """The ``python`` jinja global of gramine-manifest, answered by the interpreter fldsl runs on."""

    def __init__(self) -> None:
        paths = sysconfig.get_paths()
        self.stdlib = paths["stdlib"]
        self.platstdlib = paths["platstdlib"]
        self.purelib = paths["purelib"]
        self.distlib = paths["purelib"]
        self.ext_suffix = sysconfig.get_config_var("EXT_SUFFIX") or ""
        self.implementation = sys.implementation.name

    def get_sys_path(self, interpreter: str) -> list[PurePosixPath]:
        return local_sys_path(interpreter)

    def get_paths(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        return sysconfig.get_paths(*args, **kwargs)


def local_arch_libdir() -> str:
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return f"/lib/{multiarch}"


def render_local(template: str, entrypoint: str | None = None) -> str:
    """Render a Gramine manifest template the way gramine-manifest would on this machine."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.globals.update(gramine=_LocalGramine(), python=_LocalPython(), env={})
    try:
        text = env.from_string(template).render(
            entrypoint=entrypoint or sys.executable, arch_libdir=local_arch_libdir()
        )
    except jinja2.TemplateError as e:
        raise ManifestError(f"manifest template does not render: {e}") from e
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # a bug in the template, not a user error; say where anyway
        raise ManifestError(f"rendered manifest is not valid TOML: {e}") from e
    return text


def render_node_manifest(inputs: ManifestInputs) -> RenderedManifest:
    """The node's Gramine template and the same manifest rendered for this machine (deterministic)."""
    template = render_template(inputs)
    return RenderedManifest(template=template, toml=render_local(template))


def gramine_manifest_command(
    template: str, output: str, entrypoint: str, arch_libdir: str = "/lib/x86_64-linux-gnu"
) -> list[str]:
    """The ``gramine-manifest`` call that renders a node's template on the deployment host: the template
    needs exactly the ``entrypoint`` (the venv's python3, where fldsl is installed) and ``arch_libdir``
    defines (no trailing slash)."""
    if not entrypoint.startswith("/"):
        raise ManifestError(f"the entrypoint must be an absolute path, got {entrypoint!r}")
    if not arch_libdir.startswith("/") or arch_libdir.endswith("/"):
        raise ManifestError(f"arch_libdir must be absolute without a trailing /, got {arch_libdir!r}")
    defines = [f"-Dentrypoint={entrypoint}", f"-Darch_libdir={arch_libdir}"]
    return ["gramine-manifest", *defines, template, output]


def lint_context_for(inputs: ManifestInputs) -> LintContext:
    """The production lint context matching what :func:`render_node_manifest` was asked to render."""
    return LintContext(
        production=True,
        debug_allowed=inputs.debug,
        required_trusted=sorted(f.uri for f in inputs.node_files),
        at_rest_encrypted=inputs.outputs_encrypted,
    )


# ---------------------------------------------------------------------------------------------------------
# Reading back (the runtime)
# ---------------------------------------------------------------------------------------------------------


def trusted_node_files(toml_text: str) -> dict[str, str]:
    """File name → sha256 of every measured file of the node's build folder listed in a rendered manifest
    (``{ uri = "file:/fldsl/node/plan.json", sha256 = ... }`` → ``{"plan.json": ...}``)."""
    try:
        doc = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"node manifest is not valid TOML: {e}") from e
    entries = doc.get("sgx", {}).get("trusted_files", [])
    if not isinstance(entries, list):
        raise ManifestError("node manifest: sgx.trusted_files is not an array")
    out: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue  # a plain string entry is hashed at sign time: no hash to compare against here
        uri, sha = entry.get("uri"), entry.get("sha256")
        if not isinstance(uri, str) or not uri.startswith(NODE_DIR_URI):
            continue
        name = uri[len(NODE_DIR_URI):]
        if not isinstance(sha, str) or not _SHA256.match(sha) or not _FILE_NAME.match(name):
            raise ManifestError(f"node manifest: trusted file {uri!r} has no valid sha256")
        if name in out:
            raise ManifestError(f"node manifest: {uri!r} is listed twice in sgx.trusted_files")
        out[name] = sha
    return out
