"""Reading a node's measured files back from its rendered Gramine manifest: shared by the compiler (which
writes the manifest, ``fldsl.compiler.manifest``) and the node's start-up check (``fldsl.runtime.node``).

One reader, so that the node cannot accept a manifest the compiler would refuse (a malformed hash, a file
listed twice): it used to have its own, laxer copy because the runtime never imports the compiler. Pure
``tomllib``: the node imports it before anything heavy.
"""

from __future__ import annotations

import re
import tomllib

# The node's build folder, relative to its working folder on the host (the runner links it there); the
# trusted uris of plan.json / policy.json live under it and the node finds them by this prefix (keep it
# stable: it is part of the measurement).
NODE_DIR_URI = "file:node/"

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PLAIN_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class TrustedFilesError(ValueError):
    """The manifest's trusted-file list is malformed: whoever reads it must refuse the node."""


def trusted_node_files(toml_text: str) -> dict[str, str]:
    """File name → sha256 of every measured file of the node's build folder listed in a rendered manifest
    (``{ uri = "file:node/plan.json", sha256 = ... }`` → ``{"plan.json": ...}``)."""
    try:
        doc = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        raise TrustedFilesError(f"node manifest is not valid TOML: {e}") from e
    sgx = doc.get("sgx", {})
    entries = sgx.get("trusted_files", []) if isinstance(sgx, dict) else None
    if not isinstance(entries, list):
        raise TrustedFilesError("node manifest: sgx.trusted_files is not an array")
    out: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue  # a plain string entry is hashed at sign time: no hash to compare against here
        uri, sha = entry.get("uri"), entry.get("sha256")
        if not isinstance(uri, str) or not uri.startswith(NODE_DIR_URI):
            continue
        name = uri[len(NODE_DIR_URI):]
        if not isinstance(sha, str) or not SHA256_HEX.match(sha) or not PLAIN_FILE_NAME.match(name):
            raise TrustedFilesError(f"node manifest: trusted file {uri!r} has no valid sha256")
        if name in out:
            raise TrustedFilesError(f"node manifest: {uri!r} is listed twice in sgx.trusted_files")
        out[name] = sha
    return out
