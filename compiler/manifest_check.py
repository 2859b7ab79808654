"""Our own Gramine v1.9 manifest validator and fldsl's production lint (Gramine v1.9's manifest documentation
and its PAL's checks).

Gramine is not installed where fldsl compiles, and its checker (graminelibos) is not on PyPI, so this
module re-states the v1.9 schema (unknown keys anywhere are errors), the PAL's runtime checks
(power-of-two enclave size, thread limits, ...) and the deprecation history (each old key with
its replacement). It validates a manifest as ``gramine-manifest`` sees it, i.e. before defaults such as
``loader.entrypoint`` are injected.

On top of that, :class:`LintContext` turns on the rules a production fldsl node must satisfy: no
``insecure__*`` option, no debug enclave unless the pipeline allows it, DCAP attestation, the node's plan
and policy measured, outputs on encrypted mounts and no unmeasured file shadowing them.

Every finding names the key (``fs.mounts[3].type``) and says how to fix it.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from pydantic import BaseModel, Field

from fldsl.compiler.manifest_schema import SCHEMA, Finding, _covers, _err, _get, _join, _mount_for, _semantic

# Finding is part of this module's interface (fldsl.compiler.manifest, the tests).
__all__ = ["Finding", "LintContext", "errors", "validate_manifest"]


class LintContext(BaseModel):
    """Which fldsl rules apply on top of the schema. ``production`` adds the hardening rules."""

    production: bool = True
    debug_allowed: bool = False
    required_trusted: list[str] = Field(default_factory=list)  # uris that must be in sgx.trusted_files
    at_rest_encrypted: bool = True
    output_paths: list[str] = Field(default_factory=lambda: ["/sealed"])  # enclave paths the node writes
    # Allowed folders the node writes into itself (its sealed checkpoints and models): not "broad".
    output_dirs: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# fldsl lint
# ---------------------------------------------------------------------------------------------------------


def _insecure_keys(node: Any, prefix: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for name, value in node.items():
            full = _join(prefix, name)
            if "insecure__" in name:
                found.append((full, value))
            else:
                found += _insecure_keys(value, full)
    return found


_INSECURE_WHY = {
    "loader.insecure__use_cmdline_argv": "lets the untrusted host choose the node's command line; fldsl "
    "nodes use the fixed `loader.argv`",
    "loader.insecure__use_host_env": "lets the untrusted host set environment variables (LD_PRELOAD, ...)",
    "loader.insecure__disable_aslr": "disables address-space randomisation",
    "fs.insecure__keys": "hard-codes an encryption key into the manifest, readable by anyone",
    "sgx.insecure__rpc_thread_num": "exposes enclave/host communication to the host (exitless mode)",
    "sgx.insecure__allow_memfaults_without_exinfo": "hides memory-fault details the enclave needs",
    "sys.insecure__allow_eventfd": "lets the host inject events through eventfd",
}


def _file_entries(doc: dict[str, Any], key: str) -> list[tuple[int, str]]:
    raw = _get(doc, key, [])
    out: list[tuple[int, str]] = []
    if isinstance(raw, list):
        for i, e in enumerate(raw):
            uri = e.get("uri") if isinstance(e, dict) else e
            if isinstance(uri, str):
                out.append((i, uri))
    return out


def _lint(doc: dict[str, Any], ctx: LintContext, out: list[Finding]) -> None:
    trusted = _file_entries(doc, "sgx.trusted_files")
    allowed = _file_entries(doc, "sgx.allowed_files")

    if ctx.production:
        _lint_production(doc, ctx, out, trusted, allowed)
    for uri in ctx.required_trusted:
        if not any(e == uri or (e.endswith("/") and _covers(e, uri)) for _, e in trusted):
            _err(out, "untrusted-node-file", "sgx.trusted_files",
                 f'`{uri}` is not in `sgx.trusted_files`: the host could change it unnoticed; add '
                 f'{{ uri = "{uri}", sha256 = "..." }}')
        for i, a in allowed:
            if _covers(a, uri):
                _err(out, "allowed-covers-config", f"sgx.allowed_files[{i}]",
                     f'`sgx.allowed_files[{i}]` = "{a}" makes `{uri}` readable without measurement; '
                     "narrow or remove it")
    _lint_outputs(doc, ctx, out, allowed)


def _lint_production(
    doc: dict[str, Any], ctx: LintContext, out: list[Finding], trusted: list[tuple[int, str]],
    allowed: list[tuple[int, str]],
) -> None:
    """The hardening rules of a production node: no insecure or debug option, DCAP, quiet logs, strict file
    checks, measured files, narrow allowed files, no host environment."""
    for key, value in _insecure_keys(doc, ""):
        if value in (False, 0, {}, None, ""):
            continue  # explicitly off: harmless
        why = _INSECURE_WHY.get(key, "is an insecure, debugging-only option")
        _err(out, "insecure-key", key, f"`{key}` {why}; remove it from a production manifest")
    if _get(doc, "sgx.debug") is True:
        if ctx.debug_allowed:
            _err(out, "debug-enclave", "sgx.debug",
                 "debug enclave: the host can read its memory; fine for development only", "warning")
        else:
            _err(out, "debug-enclave", "sgx.debug",
                 "`sgx.debug = true` lets the host read the enclave's memory; set `sgx.debug = false` "
                 "(or allow debug in the pipeline's trust block for development)")
    ra = _get(doc, "sgx.remote_attestation", "none")
    if ra != "dcap" and not isinstance(ra, bool):  # a boolean is already a deprecated-value error
        _err(out, "remote-attestation", "sgx.remote_attestation",
             f'`sgx.remote_attestation` is {ra!r}: peers cannot verify this node; set it to "dcap"')
    level = _get(doc, "loader.log_level", "error")
    if level not in ("error", "none"):
        _err(out, "log-level", "loader.log_level",
             f'`loader.log_level = "{level}"` logs enclave internals to the host; use "error"')
    if _get(doc, "sgx.file_check_policy") == "allow_all_but_log":
        _err(out, "file-check-policy", "sgx.file_check_policy",
             '`sgx.file_check_policy = "allow_all_but_log"` lets the enclave open unmeasured files; '
             'use "strict"')
    if not trusted:
        _err(out, "empty-trusted-files", "sgx.trusted_files",
             "`sgx.trusted_files` is empty: nothing the enclave loads is measured; list the interpreter, "
             "libraries, code and the node's plan and policy")
    for i, a in allowed:
        if (a.endswith("/") and a not in ctx.output_dirs) or a in ("file:", "file:/", "dev:"):
            _err(out, "broad-allowed-file", f"sgx.allowed_files[{i}]",
                 f'`sgx.allowed_files[{i}]` = "{a}" lets the host hand the enclave any unmeasured file '
                 "under it; list single files", "warning")
    env = _get(doc, "loader.env", {})
    if isinstance(env, dict):
        for name, value in env.items():
            if isinstance(value, dict) and value.get("passthrough") is True:
                _err(out, "env-passthrough", f"loader.env.{name}",
                     f"`loader.env.{name}` is passed through from the untrusted host; set a fixed value",
                     "warning")


def _lint_outputs(
    doc: dict[str, Any], ctx: LintContext, out: list[Finding], allowed: list[tuple[int, str]]
) -> None:
    """What the node writes is on an encrypted mount, and no allowed file overlaps it."""
    mounts = _get(doc, "fs.mounts", [])
    if ctx.at_rest_encrypted and isinstance(mounts, list):
        for path in ctx.output_paths:
            m = _mount_for(path, mounts)
            if m is None:
                _err(out, "output-not-encrypted", "fs.mounts",
                     f"output path `{path}` is not on any of `fs.mounts`; add "
                     f'{{ type = "encrypted", path = "{path}", uri = "file:...", '
                     'key_name = "_sgx_mrenclave" }')
                continue
            idx = mounts.index(m)
            if m.get("type") != "encrypted":
                _err(out, "output-not-encrypted", f"fs.mounts[{idx}].type",
                     f'output path `{path}` is on a plain ({m.get("type", "chroot")}) mount '
                     f'`fs.mounts[{idx}]`, so the host reads what the node writes; use type = "encrypted" '
                     'with key_name = "_sgx_mrenclave"')
                continue
            host = m.get("uri")
            for i, a in allowed:
                if isinstance(host, str) and (_covers(a, host) or _covers(host, a)):
                    _err(out, "allowed-covers-output", f"sgx.allowed_files[{i}]",
                         f'`sgx.allowed_files[{i}]` = "{a}" overlaps the encrypted output folder `{host}`; '
                         "remove it")


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def validate_manifest(toml_text: str, lint: LintContext | None = None) -> list[Finding]:
    """All findings for a Gramine v1.9 manifest (schema + runtime checks; plus fldsl lint if ``lint``)."""
    try:
        doc = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        text = str(e)
        pos = _TOML_POS.search(text)
        line, col = (int(pos.group(1)), int(pos.group(2))) if pos else (None, None)
        reason = _TOML_POS.sub("", text).strip()
        where = f"line {line}, column {col}" if pos else "end of document"
        return [Finding(code="toml-syntax", key="", severity="error", line=line, column=col,
                        message=f"not valid TOML at {where}: {reason}")]
    out: list[Finding] = []
    SCHEMA(doc, "", out)
    _semantic(doc, out)
    if lint is not None:
        _lint(doc, lint, out)
    return out


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]
