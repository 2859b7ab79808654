"""Pass 1, resolve: parameters, ``use`` imports, parties and their nodes (data declarations go to
:mod:`fldsl.compiler.schema`).
"""

from __future__ import annotations

from typing import Any

from fldsl.compiler import ast, schema
from fldsl.compiler.checkstate import CheckState, Party, _Fatal, _type_word
from fldsl.compiler.values import BAD, PARAM_TYPES, Env, convert_param, describe
from fldsl.diagnostics import Diagnostic, did_you_mean, suggest
from fldsl.stdlib import signatures as sig

STD_MODULES = {"std.models": sorted(sig.OPS)}
MAX_FAMILY = 256


def check_params(ck: CheckState) -> Env:
    params: dict[str, Any] = {}
    types: dict[str, str] = {}
    for p in ck.m.params:
        name, ptype = p.name.value, p.type.value
        if name in params:
            ck.error(p.name.span, f"parameter `{name}` is declared twice")
            continue
        if ptype not in PARAM_TYPES:
            best = did_you_mean(ptype, PARAM_TYPES)
            ck.error(
                p.type.span,
                f"unknown parameter type `{ptype}`" + (f"; did you mean `{best}`?" if best else ""),
                None if best else "parameter types are int, float, str and path",
            )
            params[name], types[name] = BAD, "bad"  # uses are not reported again
            continue
        d = p.default
        ok = (
            (ptype == "int" and d.kind == "int")
            or (ptype == "float" and d.kind in ("int", "float"))
            or (ptype in ("str", "path") and d.kind == "str")
        )
        if not ok:
            ck.error(d.span, f"default of `{name}` must be {_type_word(ptype)}, got {describe(d)}")
            params[name], types[name] = BAD, "bad"
            continue
        params[name] = float(d.value) if ptype == "float" else d.value  # type: ignore[arg-type]
        types[name] = ptype
    for key, raw in ck.overrides.items():
        if types.get(key) == "bad":
            continue
        if key not in params:
            msg, hint = suggest("parameter", key, params)
            ck.diags.append(
                Diagnostic(
                    "error", f"--set {key}={raw}: {msg}", ck.file, hint=hint or _no_params(params)
                )
            )
            continue
        try:
            params[key] = convert_param(raw, types[key])
        except ValueError as e:
            ck.diags.append(
                Diagnostic(
                    "error", f"--set {key}={raw}: {e} (parameter `{key}` is {types[key]})", ck.file
                )
            )
    return Env(params, types)


def check_uses(ck: CheckState) -> None:
    for u in ck.m.uses:
        parts = [n.value for n in u.module]
        names = u.names
        if names is None:
            if len(parts) < 2:
                ck.error(
                    u.span, f"`use {'.'.join(parts)}` imports nothing", "write `use std.models.{mlp}`"
                )
                continue
            names = [u.module[-1]]
            parts = parts[:-1]
        mod = ".".join(parts)
        if mod not in STD_MODULES:
            ck.unknown(
                _join(u.module[0].span, u.module[len(parts) - 1].span), "module", mod, STD_MODULES
            )
            continue
        if mod not in ck.uses:
            ck.uses.append(mod)
        for n in names:
            if n.value not in STD_MODULES[mod]:
                ck.unknown_in(n.span, f"module `{mod}`", "name", n.value, STD_MODULES[mod])
            else:
                ck.imported.add(n.value)


def check_parties(ck: CheckState, env: Env) -> None:
    if not ck.m.parties:
        ck.error(
            ck.m.name.span, "the pipeline declares no party", "add `party NAME { node trainer }`"
        )
        raise _Fatal
    for pd in ck.m.parties:
        members: list[tuple[str, int | None]]
        if pd.range is not None:
            r = pd.range
            if r.lo > r.hi or r.hi - r.lo >= MAX_FAMILY or r.lo < 0:
                ck.error(r.span, f"invalid range [{r.lo}..{r.hi}] (need 0 <= low <= high, at most 256)")
                continue
            members = [(f"{pd.name.value}{k}", k) for k in range(r.lo, r.hi + 1)]
            if pd.name.value in ck.families or pd.name.value in ck.parties:
                ck.error(pd.name.span, f"party `{pd.name.value}` is declared twice")
                continue
            ck.families[pd.name.value] = [n for n, _ in members]
        else:
            members = [(pd.name.value, None)]
        nodes, node_fams = _nodes(ck, pd)
        for pname, idx in members:
            if pname in ck.parties or (pname in ck.families and idx is None):
                ck.error(pd.name.span, f"party `{pname}` is declared twice")
                continue
            party = Party(
                pname,
                pd.name.value if idx is not None else None,
                idx,
                pd.description,
                nodes,
                node_fams,
                pd.span,
            )
            ck.parties[pname] = party
            for dd in pd.data:
                if dd.name.value in party.datasets:
                    ck.error(dd.name.span, f"data set `{dd.name.value}` is declared twice in `{pname}`")
                    continue
                ds = schema.dataset(ck, dd, pname, env.child(idx))
                if ds is not None:
                    party.datasets[dd.name.value] = ds


def _nodes(ck: CheckState, pd: ast.PartyDecl) -> tuple[list[str], dict[str, str]]:
    names: list[str] = []
    fams: dict[str, str] = {}
    if not pd.nodes:
        ck.error(pd.name.span, f"party `{pd.name.value}` declares no node", "add `node trainer` to it")
    for nd in pd.nodes:
        if nd.range is not None:
            r = nd.range
            if r.lo > r.hi or r.hi - r.lo >= MAX_FAMILY or r.lo < 0:
                ck.error(r.span, f"invalid range [{r.lo}..{r.hi}] (need 0 <= low <= high, at most 256)")
                continue
            new = [f"{nd.name.value}{k}" for k in range(r.lo, r.hi + 1)]
            for n in new:
                fams[n] = nd.name.value
        else:
            new = [nd.name.value]
        for n in new:
            if n in names:
                ck.error(nd.name.span, f"node `{n}` is declared twice in party `{pd.name.value}`")
            else:
                names.append(n)
    return names, fams


def _join(a: ast.Span, b: ast.Span) -> ast.Span:
    return ast.Span(a.line, a.column, b.end_line, b.end_column)


def _no_params(params: dict[str, Any]) -> str | None:
    if params:
        return None
    return "this pipeline declares no parameters"
