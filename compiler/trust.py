"""Pass 6, trust: the ``trust`` block (enclaves, attestation, at-rest keys) and its ``allow`` rules,
which the information-flow pass (:mod:`fldsl.compiler.flows`) checks every flow against.
"""

from __future__ import annotations

import re
from typing import Any

from fldsl.artifacts import (
    TensorSpec,
)
from fldsl.compiler import ast
from fldsl.compiler.checkstate import CheckState, Rule, _arg_span
from fldsl.compiler.ir import IRTrust
from fldsl.compiler.values import Env
from fldsl.stdlib import signatures as sig


def check_trust(ck: CheckState, env: Env) -> IRTrust:
    trust = IRTrust()
    if not ck.m.trusts:
        ck.error(
            ck.m.name.span, "the pipeline has no `trust { ... }` block", "add at least the allow rules"
        )
        return trust
    for extra in ck.m.trusts[1:]:
        ck.error(extra.span, "only one `trust` block is allowed")
    seen: set[type] = set()
    for item in ck.m.trusts[0].items:
        if not isinstance(item, ast.AllowStmt):
            if type(item) in seen:
                ck.error(item.span, "this setting is given twice in the trust block")
                continue
            seen.add(type(item))
        match item:
            case ast.EnclaveStmt(call=call):
                if call.func.value != "sgx":
                    ck.unknown(call.func.span, "enclave kind", call.func.value, ["sgx"])
                    continue
                args = ck._bind(call, sig.ENCLAVE_PARAMS, "`sgx(...)`", env)
                if args is not None and _enclave_ok(ck, call, args):
                    for k, v in args.items():
                        setattr(trust, k, v)
                    if args["debug"]:
                        ck.warning(
                            _arg_span(call, "debug") or call.span,
                            "enclaves are built in debug mode (`debug: true`): the host can read "
                            "enclave memory, so this pipeline is not confidential",
                            "use `debug: false` for production",
                        )
            case ast.AttestationStmt(mode=mode):
                if mode.value not in ("dcap", "sim"):
                    ck.unknown(mode.span, "attestation mode", mode.value, ["dcap", "sim"])
                else:
                    trust.attestation = mode.value  # type: ignore[assignment]
            case ast.AtRestStmt(mode=mode):
                if mode.value not in ("encrypted", "plain"):
                    ck.unknown(mode.span, "at_rest mode", mode.value, ["encrypted", "plain"])
                else:
                    trust.at_rest = mode.value  # type: ignore[assignment]
                    if mode.value == "plain":
                        ck.warning(
                            mode.span,
                            "checkpoints and exported models are written unencrypted (`at_rest plain`)",
                        )
            case ast.AllowStmt():
                rules = _rules(ck, item)
                if rules:
                    ck.rules += rules
                    trust.rules.append(item.text)
    return trust


def _enclave_ok(ck: CheckState, call: ast.Call, args: dict[str, Any]) -> bool:
    """Enclave settings Gramine accepts (checked here so the error points at the source)."""
    ok = True
    size = args["enclave_size"]
    m = re.fullmatch(r"([1-9][0-9]*)([KMG]?)", size)
    n = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)] if m else 0
    if n <= 0 or n & (n - 1):
        ck.error(
            _arg_span(call, "enclave_size") or call.span,
            f'`enclave_size` must be a power of two such as "8G" or "512M", got "{size}"',
        )
        ok = False
    for key, lo, hi in (("max_threads", 1, 4096), ("isv_prod_id", 0, 65535), ("isv_svn", 0, 65535)):
        if not lo <= args[key] <= hi:
            span = _arg_span(call, key) or call.span
            ck.error(span, f"`{key}` must be in {lo}..{hi}, got {args[key]}")
            ok = False
    return ok


def _endpoint(ck: CheckState, ref: ast.Ref) -> tuple[str, str | None] | None:
    if len(ref.parts) > 2:
        ck.error(ref.span, f"an allow rule names a party or `party.node`, got `{ref.text}`")
        return None
    pname = ref.parts[0].value
    if pname not in ck.parties and pname not in ck.families:
        ck.unknown(ref.parts[0].span, "party", pname, [*ck.parties, *ck.families])
        return None
    if len(ref.parts) == 2:
        members = ck.families.get(pname, [pname])
        nodes = {n for m in members for n in ck.parties[m].nodes}
        nodes |= {f for m in members for f in ck.parties[m].node_families.values()}
        if ref.parts[1].value not in nodes:
            ck.unknown_in(ref.parts[1].span, f"party `{pname}`", "node", ref.parts[1].value, nodes)
            return None
        return pname, ref.parts[1].value
    return pname, None


def _rules(ck: CheckState, a: ast.AllowStmt) -> list[Rule]:
    """One rule per (source, destination) pair of the statement."""
    srcs = [_endpoint(ck, r) for r in a.srcs]
    dsts = [_endpoint(ck, r) for r in a.dsts]
    tp = a.tensor
    known = [k for k in ck.tensors]
    ok = True
    if tp.wrapper is not None:
        if tp.wrapper.value != "grad":
            ck.error(
                tp.wrapper.span, f"unknown tensor function `{tp.wrapper.value}` (only `grad(...)`)"
            )
            ok = False
        elif tp.ref.text not in ck.tensors:
            ck.unknown(tp.ref.span, "tensor", tp.ref.text, known)
            ok = False
    else:
        name = tp.ref.text
        specials = ("gradients", "weights", "shard", "stats")
        if name not in ck.tensors and name not in specials:
            if len(tp.ref.parts) == 2 and any(
                tp.ref.parts[0].value in p.datasets for p in ck.parties.values()
            ):
                pass  # a raw data set field; checked against the flows
            else:
                ck.unknown(tp.ref.span, "tensor", name, [*known, *specials])
                ok = False
    if None in srcs or None in dsts or not ok:
        return []
    as_spec = _type_spec(ck, a.as_type) if a.as_type is not None else None
    return [
        Rule(a, s[0], s[1], d[0], d[1], tp.text, as_spec)
        for s in srcs
        for d in dsts
        if s is not None and d is not None
    ]


def _type_spec(ck: CheckState, t: ast.TypeSpecExpr) -> TensorSpec | None:
    dtypes = ("float32", "float64", "int32", "int64", "bool")
    if t.dtype.value not in dtypes:
        ck.unknown(t.dtype.span, "dtype", t.dtype.value, dtypes)
        return None
    shape: list[int | None] = []
    for d in t.dims:
        if isinstance(d, ast.Name):
            if d.value not in ("batch", "B"):
                ck.error(d.span, f"a dimension is a number or `batch`, got `{d.value}`")
                return None
            shape.append(None)
        elif d.kind != "int" or int(d.value) <= 0:  # type: ignore[arg-type]
            ck.error(d.span, "a dimension must be a positive whole number")
            return None
        else:
            shape.append(int(d.value))  # type: ignore[arg-type]
    return TensorSpec(shape=shape, dtype=t.dtype.value)  # type: ignore[arg-type]


