"""Evaluating argument values of the language: literals, parameters, `${param}` / `{i}` substitution.

Shared by the checker for reader calls, op parameters, the train block and the enclave settings. A value
that does not fit reports one diagnostic through the ``report`` callback and yields :data:`BAD`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fldsl.compiler import ast
from fldsl.diagnostics import did_you_mean

BAD: Any = object()  # an argument that already produced a diagnostic

Report = Callable[[ast.Span, str, str | None], None]

PARAM_TYPES = ("int", "float", "str", "path")
_SUBST = re.compile(r"\$\{([^}]*)\}|\{i\}")


@dataclass
class Env:
    params: dict[str, Any]
    param_types: dict[str, str]
    index: int | None = None  # `i` inside a `party name[a..b]` family
    used_params: set[str] = field(default_factory=set)  # parameters a value was built from

    def child(self, index: int | None) -> Env:
        return Env(self.params, self.param_types, index, self.used_params)


def describe(expr: Any) -> str:
    match expr:
        case ast.Literal_(kind="str"):
            return "a string"
        case ast.Literal_(kind="int"):
            return "an integer"
        case ast.Literal_(kind="float"):
            return "a number"
        case ast.Literal_(kind="bool"):
            return "`true`/`false`"
        case ast.Literal_(kind="none"):
            return "`none`"
        case ast.ListExpr():
            return "a list"
        case ast.Call():
            return f"a call of `{expr.func.value}`"
        case ast.Ref():
            return f"`{expr.text}`"
        case ast.BinOp():
            return "an arithmetic expression"
    return "a value"


def substitute(text: str, span: ast.Span, env: Env, report: Report) -> Any:
    """Replace ``${param}`` and ``{i}`` in a string literal."""
    ok = True

    def repl(m: re.Match[str]) -> str:
        nonlocal ok
        if m.group(0) == "{i}":
            if env.index is None:
                report(span, "`{i}` is only defined inside a party family such as `party bank[1..4]`", None)
                ok = False
                return ""
            return str(env.index)
        name = m.group(1)
        if name not in env.params:
            best = did_you_mean(name, env.params)
            msg = f"unknown parameter `{name}` in string" + (f"; did you mean `{best}`?" if best else "")
            report(span, msg, None if best or not env.params else "declare it with `param NAME: TYPE = ...`")
            ok = False
            return ""
        env.used_params.add(name)
        if env.params[name] is BAD:
            ok = False
            return ""
        return str(env.params[name])

    out = _SUBST.sub(repl, text)
    return out if ok else BAD


def _param_ref(expr: ast.Ref, env: Env) -> tuple[bool, Any]:
    if len(expr.parts) != 1:
        return False, None
    name = expr.parts[0].value
    if name == "i" and env.index is not None:
        return True, env.index
    if name in env.params:
        env.used_params.add(name)
        return True, env.params[name]  # BAD for a parameter whose declaration was already reported
    return False, None


def evaluate(
    expr: Any, ptype: str, env: Env, what: str, report: Report, choices: tuple[str, ...] = ()
) -> Any:
    """Value of ``expr`` as ``ptype`` ("int", "float", "str", "name", "bool", "list[int]", "list[str]")."""
    span: ast.Span = expr.span

    def bad(expected: str) -> Any:
        report(span, f"{what} must be {expected}, got {describe(expr)}", None)
        return BAD

    if ptype.startswith("list["):
        inner = ptype[5:-1]
        if not isinstance(expr, ast.ListExpr):
            example = "e.g. [64, 32]" if inner == "int" else 'e.g. ["x*"]'
            return bad(f"a list ({example})")
        vals = [evaluate(x, inner, env, f"an element of {what}", report, choices) for x in expr.items]
        return BAD if any(v is BAD for v in vals) else vals

    value: Any
    if isinstance(expr, ast.BinOp):
        if ptype not in ("int", "float"):
            return bad(_expected(ptype))
        left = evaluate(expr.left, ptype, env, what, report)
        right = evaluate(expr.right, ptype, env, what, report)
        if left is BAD or right is BAD:
            return BAD
        result = {"+": left + right, "-": left - right, "*": left * right}[expr.op]
        if abs(result) > 10**15:
            report(span, f"{what} is out of range ({result})", None)
            return BAD
        return result
    if isinstance(expr, ast.Ref):
        found, value = _param_ref(expr, env)
        if found and value is BAD:
            return BAD
        if not found:
            # A bare identifier is accepted where a name or a keyword-like string is expected.
            if (ptype == "name" or (ptype == "str" and choices)) and len(expr.parts) == 1:
                value = expr.text
            else:
                if len(expr.parts) == 1 and ptype in ("int", "float", "str"):
                    best = did_you_mean(expr.text, [*env.params, *(["i"] if env.index is not None else [])])
                    if best:
                        report(span, f"unknown parameter `{expr.text}`; did you mean `{best}`?", None)
                        return BAD
                return bad(_expected(ptype))
    elif isinstance(expr, ast.Literal_):
        value = expr.value
        if expr.kind == "str":
            value = substitute(str(value), span, env, report)
            if value is BAD:
                return BAD
    else:
        return bad(_expected(ptype))

    if ptype == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return bad("an integer")
        return value
    if ptype == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return bad("a number")
        return float(value)
    if ptype == "bool":
        if not isinstance(value, bool):
            return bad("`true` or `false`")
        return value
    if ptype in ("str", "name"):
        if not isinstance(value, str):
            return bad("a string" if ptype == "str" else "a name")
        if choices and value not in choices:
            best = did_you_mean(value, choices)
            opts = ", ".join(f"`{c}`" for c in choices)
            tail = f"; did you mean `{best}`?" if best else f" (one of {opts})"
            report(span, f"{what} cannot be `{value}`{tail}", None)
            return BAD
        return value
    raise AssertionError(f"unknown parameter type {ptype}")


def _expected(ptype: str) -> str:
    return {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "name": "a name",
        "bool": "`true` or `false`",
    }.get(ptype, ptype)


def convert_param(raw: str, ptype: str) -> Any:
    """A ``--set name=value`` string as the parameter's type; raises ValueError with a short reason."""
    if ptype == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"`{raw}` is not an integer") from None
    if ptype == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"`{raw}` is not a number") from None
    return raw
