"""Information flow, last step: every cross-party flow the scenario produced is checked against the trust
block's ``allow`` rules (:mod:`fldsl.compiler.flows` builds the flows; a protocol flow needs no rule)."""

from __future__ import annotations

from dataclasses import dataclass

from fldsl.artifacts import Flow
from fldsl.compiler import ast
from fldsl.compiler.checkstate import CheckState, Rule
from fldsl.stdlib.signatures import fmt_spec


@dataclass
class PendingFlow:
    flow: Flow
    path: list[str] | None  # None: a protocol flow that needs no allow rule
    span: ast.Span | None = None
    raw: bool = False


def _endpoint_matches(c: CheckState, party: str, node: str | None, node_id: str) -> bool:
    pname, nname = node_id.split(".", 1)
    p = c.parties[pname]
    if party not in (pname, p.family):
        return False
    return node is None or node == nname or p.node_families.get(nname) == node

def _matches(c: CheckState, r: Rule, f: Flow) -> bool:
    return (
        r.tensor == f.tensor
        and _endpoint_matches(c, r.src_party, r.src_node, f.src)
        and _endpoint_matches(c, r.dst_party, r.dst_node, f.dst)
    )

def _who(c: CheckState, node_id: str) -> str:
    p = c.parties[node_id.split(".")[0]]
    return p.family or p.name

def apply_rules(c: CheckState, pending: list[PendingFlow], violations: list[dict[str, str]]) -> list[Flow]:
    """The flows the allow rules permit (protocol flows need none); each refused one reported and kept
    in ``violations`` (for drawing it in red), and every rule no flow used warned about."""
    out: list[Flow] = []
    for p in pending:
        f = p.flow
        if p.path is None:
            out.append(f)
            continue
        rule = next((r for r in c.rules if _matches(c, r, f)), None)
        if rule is None:
            path = " → ".join(p.path) + " (no allow rule)"
            dst_party = f.dst.split(".")[0]
            if p.raw:
                msg = (
                    f"raw feature column `{p.path[0]}` would be sent to `{dst_party}` without an allow "
                    f"rule: {path}"
                )
            else:
                msg = f"information flow: `{f.tensor}` would carry `{p.path[0]}` to `{dst_party}`: {path}"
            violations.append({"src": f.src, "dst": f.dst, "tensor": f.tensor, "message": msg})
            c.error(
                p.span,
                msg,
                f"if this is intended, add `allow {_who(c, f.src)} -> {_who(c, f.dst)}: "
                f"{f.tensor}` to the trust block",
            )
            continue
        rule.used = True
        f.rule = rule.stmt.text
        f.rule_span = c.loc(rule.stmt.span)
        if rule.stmt.as_type is not None and rule.as_spec is not None:
            if f.spec is None:
                c.error(rule.stmt.as_type.span, f"`{f.tensor}` has no fixed shape; remove `as ...`")
            elif rule.as_spec != f.spec:
                c.error(
                    rule.stmt.as_type.span,
                    f"declared `{fmt_spec(rule.as_spec)}` for `{f.tensor}` but it is inferred as "
                    f"`{fmt_spec(f.spec)}`",
                )
        out.append(f)
    used = {id(r.stmt) for r in c.rules if r.used}
    warned: set[int] = set()
    for r in c.rules:
        if id(r.stmt) not in used and id(r.stmt) not in warned:
            warned.add(id(r.stmt))
            c.warning(r.stmt.span, f"allow rule is not used by any flow: `{r.stmt.text}`")
    return out
