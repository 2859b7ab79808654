"""YAML is written by hand (deterministic, no extra dependency): every string is a JSON string with the
characters YAML reads differently escaped, which is a valid YAML double-quoted scalar."""

from __future__ import annotations

import json
import re
from typing import Any


def _yaml(v: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts/lists of scalars (scalars as JSON)."""
    pad = "  " * indent
    if isinstance(v, dict):
        if not v:
            return "{}\n"
        out = []
        for k, x in v.items():
            if isinstance(x, dict | list) and x:
                out.append(f"{pad}{_key(k)}:\n{_yaml(x, indent + 1)}")
            else:
                out.append(f"{pad}{_key(k)}: {_scalar(x)}\n")
        return "".join(out)
    if isinstance(v, list):
        out = []
        for x in v:
            if isinstance(x, dict) and x:
                body = _yaml(x, indent + 1)
                first, _, rest = body.partition("\n")
                out.append(f"{pad}- {first.strip()}\n{rest}")
            else:
                out.append(f"{pad}- {_scalar(x)}\n")
        return "".join(out)
    return f"{pad}{_scalar(v)}\n"


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_./-]+", k) else _scalar(k)


# Characters JSON leaves raw that YAML reads otherwise: C1 controls and DEL (not printable in YAML), NEL and
# the Unicode line separators (line breaks to YAML 1.1 readers), lone surrogates, the BOM, non-characters.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\ufffe\uffff]")


def _scalar(x: Any) -> str:
    if isinstance(x, dict):
        return "{}"
    if isinstance(x, list):
        return json.dumps(x)
    text = json.dumps(x, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
