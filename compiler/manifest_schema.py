"""The Gramine v1.9 manifest schema, re-stated (unknown keys anywhere are errors), and the PAL's runtime
checks, as a small schema language: a spec is a callable (value, key, findings) -> None.
:mod:`fldsl.compiler.manifest_check` runs it, then fldsl's production lint."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel

Severity = Literal["error", "warning"]


class Finding(BaseModel):
    code: str  # stable identifier, e.g. "deprecated-key", "insecure-key" (tests and tools match on it)
    key: str  # dotted key with array indices, e.g. "fs.mounts[3].type"; "" for the whole document
    message: str  # what is wrong and how to fix it
    severity: Severity
    line: int | None = None  # only for TOML syntax errors (1-based)
    column: int | None = None


# ---------------------------------------------------------------------------------------------------------
# Small schema language: a spec is a callable (value, key, findings) -> None
# ---------------------------------------------------------------------------------------------------------

Spec = Callable[[Any, str, list["Finding"]], None]

SIZE_RE = re.compile(r"^[0-9]+[KMG]?$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
KEY_HEX_RE = re.compile(r"^[0-9a-fA-F]{32}$")
MASK64_RE = re.compile(r"^0[xX][0-9a-fA-F]{16}$")
MASK32_RE = re.compile(r"^0[xX][0-9a-fA-F]{8}$")
LOG_LEVELS = ("none", "error", "warning", "debug", "trace", "all")
_SIZE_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _err(out: list[Finding], code: str, key: str, message: str, severity: Severity = "error") -> None:
    out.append(Finding(code=code, key=key, message=message, severity=severity))


def _tname(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def _bool(v: Any, key: str, out: list[Finding]) -> None:
    if not isinstance(v, bool):
        _err(out, "type", key, f"`{key}` must be true or false, not {_tname(v)}")


def _int(lo: int | None = None, hi: int | None = None) -> Spec:
    def check(v: Any, key: str, out: list[Finding]) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            _err(out, "type", key, f"`{key}` must be an integer, not {_tname(v)}")
        elif (lo is not None and v < lo) or (hi is not None and v > hi):
            _err(out, "range", key, f"`{key}` = {v} is out of range; use {lo}..{hi}")

    return check


def _str(v: Any, key: str, out: list[Finding]) -> bool:
    if not isinstance(v, str):
        _err(out, "type", key, f"`{key}` must be a string, not {_tname(v)}")
        return False
    return True


def _string(v: Any, key: str, out: list[Finding]) -> None:
    _str(v, key, out)


def _enum(*values: str) -> Spec:
    def check(v: Any, key: str, out: list[Finding]) -> None:
        if _str(v, key, out) and v not in values:
            choices = ", ".join(f'"{x}"' for x in values)
            _err(out, "value", key, f'`{key}` = "{v}" is not allowed; use one of {choices}')

    return check


def _pattern(regex: re.Pattern[str], what: str, code: str = "value") -> Spec:
    def check(v: Any, key: str, out: list[Finding]) -> None:
        if _str(v, key, out) and not regex.match(v):
            _err(out, code, key, f'`{key}` = "{v}" is not {what}')

    return check


def parse_size(v: str) -> int | None:
    """Bytes of a Gramine size string that both the PAL and gramine-sgx-sign accept, else None."""
    if not SIZE_RE.match(v):
        return None
    suffix = v[-1] if v[-1] in "KMG" else ""
    return int(v[: len(v) - len(suffix)]) * _SIZE_MULT[suffix]


def _size(v: Any, key: str, out: list[Finding]) -> None:
    if _str(v, key, out) and parse_size(v) is None:
        _err(out, "size-format", key,
             f'`{key}` = "{v}" is not a size; write a number with an optional upper-case K, M or G, '
             'e.g. "16G"')


def _uri(*schemes: str) -> Spec:
    def check(v: Any, key: str, out: list[Finding]) -> None:
        if not _str(v, key, out):
            return
        if not any(v.startswith(s + ":") for s in schemes):
            want = " or ".join(f"`{s}:`" for s in schemes)
            _err(out, "uri-scheme", key,
                 f'`{key}` = "{v}" must start with {want} (e.g. "{schemes[0]}:/path")')

    return check


def _array(item: Spec) -> Spec:
    def check(v: Any, key: str, out: list[Finding]) -> None:
        if not isinstance(v, list):
            _err(out, "type", key, f"`{key}` must be an array, not {_tname(v)}")
            return
        for i, x in enumerate(v):
            item(x, f"{key}[{i}]", out)

    return check


class Table:
    """A TOML table with known keys; anything else is reported (with the replacement if deprecated)."""

    def __init__(self, fields: dict[str, Spec], required: tuple[str, ...] = (), values: Spec | None = None):
        self.fields = fields
        self.required = required
        self.values = values  # for free-form maps (loader.env, fs.insecure__keys): every value's spec

    def __call__(self, v: Any, key: str, out: list[Finding]) -> None:
        if not isinstance(v, dict):
            _err(out, "type", key or "(document)", f"`{key}` must be a table, not {_tname(v)}")
            return
        for name in self.required:
            if name not in v:
                # Name the innermost required key: "libos.entrypoint is required", not "libos is required".
                full, spec = _join(key, name), self.fields.get(name)
                while isinstance(spec, Table) and spec.required:
                    full, spec = _join(full, spec.required[0]), spec.fields.get(spec.required[0])
                _err(out, "missing-key", full, f"`{full}` is required")
        for name, value in v.items():
            full = _join(key, name)
            if self.values is not None:
                self.values(value, full, out)
            elif name in self.fields:
                self.fields[name](value, full, out)
            else:
                _unknown(full, name, list(self.fields), out)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------------------------------------
# Deprecated and removed keys (Gramine's release notes): reported instead of "unknown key"
# ---------------------------------------------------------------------------------------------------------

_ENCRYPTED_MOUNT = (
    'an `fs.mounts` entry `{ type = "encrypted", path = "...", uri = "file:...", key_name = ... }`'
)
DEPRECATED: dict[str, str] = {
    "sgx.thread_num": "was renamed in Gramine v1.4 (removed v1.5); use `sgx.max_threads`",
    "sgx.rpc_thread_num": "was removed in Gramine v1.3; use `sgx.insecure__rpc_thread_num`",
    "fs.mount": "(table form `fs.mount.NAME.{type,path,uri}`) was removed in Gramine v1.5; "
    'use the array `fs.mounts = [ { path = "...", uri = "file:..." }, ... ]`',
    "sgx.protected_files": f"was removed in Gramine v1.5; use {_ENCRYPTED_MOUNT}",
    "sgx.protected_mrenclave_files": f"was removed in Gramine v1.5; use {_ENCRYPTED_MOUNT} with "
    'key_name = "_sgx_mrenclave"',
    "sgx.protected_mrsigner_files": f"was removed in Gramine v1.5; use {_ENCRYPTED_MOUNT} with "
    'key_name = "_sgx_mrsigner"',
    "sgx.protected_files_key": "was removed in Gramine v1.5; provision the key at run time "
    "(/dev/attestation/keys/NAME) or, for debugging only, `fs.insecure__keys.NAME`",
    "sgx.insecure__protected_files_key": "was removed in Gramine v1.5; use `fs.insecure__keys.NAME` "
    "(debugging only)",
    "fs.insecure__protected_files_key": "was removed in Gramine v1.5; use `fs.insecure__keys.NAME` "
    "(debugging only)",
    "sgx.ra_client_spid": "was removed in Gramine v1.9 with EPID; use `sgx.remote_attestation = \"dcap\"`",
    "sgx.ra_client_linkable": "was removed in Gramine v1.9 with EPID; use "
    '`sgx.remote_attestation = "dcap"`',
    "loader.pal_internal_mem_size": "was removed in Gramine v1.5 and is no longer needed; delete it",
    "fs.experimental__enable_sysfs_topology": "was removed in Gramine v1.5 (always on); delete it",
    "sgx.nonpie_binary": "was removed in Gramine v1.5 and is no longer needed; delete it",
    "sgx.require_avx": 'was removed in Gramine v1.7; use `sgx.cpu_features.avx = "required"`',
    "sgx.require_avx512": 'was removed in Gramine v1.7; use `sgx.cpu_features.avx512 = "required"`',
    "sgx.require_mpx": 'was removed in Gramine v1.7; use `sgx.cpu_features.mpx = "required"`',
    "sgx.require_pkru": 'was removed in Gramine v1.7; use `sgx.cpu_features.pkru = "required"`',
    "sgx.require_amx": 'was removed in Gramine v1.7; use `sgx.cpu_features.amx = "required"`',
    "sgx.require_exinfo": "was removed in Gramine v1.7; use `sgx.use_exinfo`",
    "loader.argv0_override": "was removed in Gramine v1.3; use `loader.argv`",
    "loader.preload": "was removed in Gramine v1.2; the LibOS is `loader.entrypoint.uri` "
    "(injected by gramine-manifest: leave it out)",
    "sgx.sigfile": "is not supported anymore (rejected by Gramine at start); delete it",
    "loader.exec": "is not supported anymore (rejected by Gramine at start); use `libos.entrypoint`",
}


def _unknown(full: str, name: str, siblings: list[str], out: list[Finding]) -> None:
    if full in DEPRECATED:
        _err(out, "deprecated-key", full, f"`{full}` {DEPRECATED[full]}")
        return
    hint = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    suggestion: str | None
    if hint:
        suggestion = _join(full.rsplit(".", 1)[0], hint[0]) if "." in full else hint[0]
    else:
        # The right key in the wrong table, e.g. `loader.max_threads` for `sgx.max_threads`.
        elsewhere = [p for p in KNOWN_KEYS if p.rsplit(".", 1)[-1] == name]
        suggestion = elsewhere[0] if elsewhere else None
    msg = f"unknown key `{full}` (Gramine v1.9 rejects unknown keys)"
    if suggestion:
        msg += f"; did you mean `{suggestion}`?"
    _err(out, "unknown-key", full, msg)


# ---------------------------------------------------------------------------------------------------------
# The v1.9 schema plus per-value formats
# ---------------------------------------------------------------------------------------------------------

_MOUNT_TYPES = ("chroot", "encrypted", "tmpfs", "untrusted_shm")


def _mount(with_path: bool) -> Spec:
    def check(v: Any, key: str, out: list[Finding]) -> None:
        if not isinstance(v, dict):
            _err(out, "type", key,
                 f"`{key}` must be an inline table {{ path = ..., uri = ... }}, not {_tname(v)}")
            return
        mtype = v.get("type", "chroot")
        if mtype not in _MOUNT_TYPES:
            choices = ", ".join(f'"{t}"' for t in _MOUNT_TYPES)
            _err(out, "mount-type", f"{key}.type",
                 f"`{key}.type` = {mtype!r} is not a mount type; use one of {choices}")
            return
        scheme = "dev" if mtype == "untrusted_shm" else "file"
        fields: dict[str, Spec] = {"type": _string, "uri": _uri(scheme)}
        if with_path:
            fields["path"] = _mount_path
        if mtype == "encrypted":
            fields["key_name"] = _string
            fields["enable_recovery"] = _bool
        required = (("path",) if with_path else ()) + (() if mtype == "tmpfs" else ("uri",))
        Table(fields, required)(v, key, out)

    return check


def _mount_path(v: Any, key: str, out: list[Finding]) -> None:
    if _str(v, key, out) and not v.startswith("/"):
        _err(out, "mount-path", key, f'`{key}` = "{v}" must be an absolute path inside the enclave ("/...")')


_SHA256_SPEC = _pattern(SHA256_RE, "64 lowercase hex digits", "sha256-format")


def _trusted_entry(v: Any, key: str, out: list[Finding]) -> None:
    if isinstance(v, str):
        _uri("file")(v, key, out)
    elif isinstance(v, dict):
        Table({"uri": _uri("file"), "sha256": _SHA256_SPEC}, required=("uri",))(v, key, out)
    else:
        _err(out, "type", key, f'`{key}` must be "file:..." or {{ uri = "file:...", sha256 = "..." }}')


def _file_list(name: str, item: Spec) -> Spec:
    def check(v: Any, key: str, out: list[Finding]) -> None:
        if isinstance(v, dict):  # sgx.trusted_files.NAME = "file:..." (pre-v1.2 table form)
            _err(out, "deprecated-key", key,
                 f"`{key}.NAME = ...` (table form) was removed in Gramine v1.2; use the array "
                 f'`{name} = [ "file:...", ... ]`')
            return
        _array(item)(v, key, out)

    return check


def _remote_attestation(v: Any, key: str, out: list[Finding]) -> None:
    if isinstance(v, bool):
        _err(out, "deprecated-value", key,
             f'boolean `{key}` was removed in Gramine v1.5; use `{key} = "dcap"` (or "none")')
    elif v == "epid":
        _err(out, "deprecated-value", key,
             f'`{key} = "epid"` was removed in Gramine v1.9 (EPID is gone); use "dcap"')
    else:
        _enum("none", "dcap")(v, key, out)


def _loader_entrypoint(v: Any, key: str, out: list[Finding]) -> None:
    if isinstance(v, str):
        _err(out, "deprecated-value", key,
             f"string `{key}` was removed in Gramine v1.9; leave it out (gramine-manifest injects "
             f"`{key}.uri` and `.sha256`) or write `{key}.uri = \"file:...\"`")
        return
    Table({"uri": _uri("file"), "sha256": _SHA256_SPEC}, required=("uri",))(v, key, out)


def _env_value(v: Any, key: str, out: list[Finding]) -> None:
    if isinstance(v, str):
        return
    if not isinstance(v, dict):
        _err(out, "type", key, f'`{key}` must be "value", {{ value = "..." }} or {{ passthrough = true }}')
        return
    if "value" in v and "passthrough" in v:
        _err(out, "env-entry", key, f"`{key}` sets both `value` and `passthrough`; keep one")
        return
    if v.get("passthrough") is False:
        _err(out, "env-entry", key, f"`{key}.passthrough = false` is rejected by Gramine; delete the entry")
        return
    Table({"value": _string, "passthrough": _bool})(v, key, out)


_CPU_FEATURE = _enum("unspecified", "disabled", "required")
_CPU_FEATURE_NO_UNSPEC = _enum("disabled", "required")

SCHEMA = Table(
    {
        "fs": Table(
            {
                "mounts": _array(_mount(with_path=True)),
                "root": _mount(with_path=False),
                "start_dir": _string,
                "insecure__keys": Table({}, values=_pattern(KEY_HEX_RE, "32 hex digits (a 16-byte key)")),
            },
            required=("mounts",),
        ),
        "libos": Table({"entrypoint": _string, "check_invalid_pointers": _bool}, required=("entrypoint",)),
        "loader": Table(
            {
                # Required by the schema but injected by gramine-manifest; we validate pre-injection.
                "entrypoint": _loader_entrypoint,
                "argv": _array(_string),
                "argv_src_file": _uri("file"),
                "env": Table({}, values=_env_value),
                "env_src_file": _uri("file"),
                "gid": _int(0, None),
                "uid": _int(0, None),
                "insecure__use_cmdline_argv": _bool,
                "insecure__use_host_env": _bool,
                "insecure__disable_aslr": _bool,
                "log_file": _string,
                "log_level": _enum(*LOG_LEVELS),
            }
        ),
        "sgx": Table(
            {
                "allowed_files": _file_list("sgx.allowed_files", _uri("file", "dev")),
                "cpu_features": Table(
                    {
                        "avx": _CPU_FEATURE,
                        "avx512": _CPU_FEATURE,
                        "amx": _CPU_FEATURE,
                        "mpx": _CPU_FEATURE_NO_UNSPEC,
                        "pkru": _CPU_FEATURE_NO_UNSPEC,
                    }
                ),
                "debug": _bool,
                "edmm_enable": _bool,
                "enable_stats": _bool,
                "insecure__allow_memfaults_without_exinfo": _bool,
                "preheat_enclave": _bool,
                "use_exinfo": _bool,
                "vtune_profile": _bool,
                "enclave_size": _size,
                "file_check_policy": _enum("strict", "allow_all_but_log"),
                "insecure__rpc_thread_num": _int(0, 256),
                "isvprodid": _int(0, 65535),
                "isvsvn": _int(0, 65535),
                "max_threads": _int(1, 4096),
                "profile": Table(
                    {
                        "enable": _enum("none", "main", "all"),
                        "mode": _enum("aex", "ocall_inner", "ocall_outer"),
                        "with_stack": _bool,
                        "frequency": _int(1, None),
                    }
                ),
                "remote_attestation": _remote_attestation,
                "seal_key": Table(
                    {
                        "flags_mask": _pattern(MASK64_RE, '"0x" followed by 16 hex digits'),
                        "xfrm_mask": _pattern(MASK64_RE, '"0x" followed by 16 hex digits'),
                        "misc_mask": _pattern(MASK32_RE, '"0x" followed by 8 hex digits'),
                    }
                ),
                "trusted_files": _file_list("sgx.trusted_files", _trusted_entry),
            }
        ),
        "sys": Table(
            {
                "allowed_ioctls": _array(Table({"request_code": _int(0, None), "struct": _string},
                                               required=("request_code",))),
                "brk": Table({"max_size": _size}),
                "disallow_subprocesses": _bool,
                "enable_extra_runtime_domain_names_conf": _bool,
                "enable_sigterm_injection": _bool,
                "experimental__enable_flock": _bool,
                "insecure__allow_eventfd": _bool,
                "ioctl_structs": lambda v, key, out: None,  # free-form in Gramine's schema too
                "debug__mock_syscalls": _array(
                    Table({"name": _string, "return": _int()}, required=("name",))
                ),
                "stack": Table({"size": _size}),
                "fds": Table({"limit": _int(1, None)}),
            }
        ),
    },
    required=("fs", "libos"),
)


def _known_keys(table: Table, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, spec in table.fields.items():
        full = _join(prefix, name)
        keys.append(full)
        if isinstance(spec, Table):
            keys += _known_keys(spec, full)
    return keys


KNOWN_KEYS: list[str] = _known_keys(SCHEMA)


# ---------------------------------------------------------------------------------------------------------
# Checks across keys (the PAL's runtime checks)
# ---------------------------------------------------------------------------------------------------------


def _get(doc: dict[str, Any], dotted: str, default: Any = None) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _semantic(doc: dict[str, Any], out: list[Finding]) -> None:
    size = _get(doc, "sgx.enclave_size")
    if isinstance(size, str):
        n = parse_size(size)
        if n is not None and (n == 0 or n & (n - 1)):
            _err(out, "enclave-size", "sgx.enclave_size",
                 f'`sgx.enclave_size` = "{size}" must be a non-zero power of two (Gramine refuses to start '
                 f'otherwise), e.g. "{_pow2_hint(n)}"')

    rpc, threads = _get(doc, "sgx.insecure__rpc_thread_num", 0), _get(doc, "sgx.max_threads")
    if isinstance(rpc, int) and isinstance(threads, int) and rpc > 0 and threads > 1024:
        _err(out, "range", "sgx.max_threads",
             "`sgx.max_threads` must be at most 1024 when `sgx.insecure__rpc_thread_num` > 0")

    if _get(doc, "sgx.preheat_enclave") is True and _get(doc, "sgx.edmm_enable") is True:
        _err(out, "preheat-edmm", "sgx.preheat_enclave",
             "`sgx.preheat_enclave = true` cannot be combined with `sgx.edmm_enable = true`; drop one")

    debug = _get(doc, "sgx.debug") is True
    for key, on in (
        ("sgx.enable_stats", _get(doc, "sgx.enable_stats") is True),
        ("sgx.vtune_profile", _get(doc, "sgx.vtune_profile") is True),
        ("sgx.profile.enable", _get(doc, "sgx.profile.enable", "none") not in ("none", None)),
    ):
        if on and not debug:
            _err(out, "needs-debug", key,
                 f"`{key}` only works in a debug enclave (`sgx.debug = true`); turn it off")

    argv_opts = [k for k in ("loader.argv", "loader.argv_src_file", "loader.insecure__use_cmdline_argv")
                 if _get(doc, k) not in (None, False)]
    if len(argv_opts) > 1:
        _err(out, "argv-conflict", argv_opts[1],
             f"`{'`, `'.join(argv_opts)}` are mutually exclusive; keep one "
             "(fldsl uses a fixed `loader.argv`)")

    mounts = _get(doc, "fs.mounts")
    if isinstance(mounts, list):
        enc = [(i, m["uri"]) for i, m in enumerate(mounts)
               if isinstance(m, dict) and m.get("type") == "encrypted" and isinstance(m.get("uri"), str)]
        for a in range(len(enc)):
            for b in range(a + 1, len(enc)):
                if _covers(enc[a][1], enc[b][1]) or _covers(enc[b][1], enc[a][1]):
                    _err(out, "encrypted-overlap", f"fs.mounts[{enc[b][0]}].uri",
                         f"encrypted mounts fs.mounts[{enc[a][0]}] and fs.mounts[{enc[b][0]}] overlap on the "
                         "host; give each its own host folder")
        entry = _get(doc, "libos.entrypoint")
        has_root = isinstance(_get(doc, "fs.root"), dict)
        if isinstance(entry, str) and not has_root and not _mount_for(entry, mounts):
            _err(out, "entrypoint-unreachable", "libos.entrypoint",
                 f'`libos.entrypoint` = "{entry}" is not under any `fs.mounts` path; mount it', "warning")


def _pow2_hint(n: int) -> str:
    p = 1
    while p < n:
        p <<= 1
    for suffix, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if p % mult == 0:
            return f"{p // mult}{suffix}"
    return str(p)


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/") or root == ""


def _covers(outer_uri: str, inner_uri: str) -> bool:
    """Whether host uri ``outer_uri`` (a file, or a folder with or without a trailing /) includes
    ``inner_uri``."""
    scheme_o, _, po = outer_uri.partition(":")
    scheme_i, _, pi = inner_uri.partition(":")
    return scheme_o == scheme_i and _under(pi.rstrip("/"), po)


def _mount_for(path: str, mounts: list[Any]) -> dict[str, Any] | None:
    """The mount that serves ``path`` inside the enclave: the one with the longest matching path."""
    best: dict[str, Any] | None = None
    for m in mounts:
        if isinstance(m, dict) and isinstance(m.get("path"), str) and _under(path, m["path"]):
            if best is None or len(m["path"].rstrip("/")) >= len(best["path"].rstrip("/")):
                best = m
    return best
