"""User-facing compiler messages: ``path:line:col: error: message``, the source line, a caret, help.

Every expected failure of the compiler is a :class:`Diagnostic`; :class:`FldslError` carries a list of them
so one run reports as many problems as it can find. The CLI renders them with :func:`render` and exits 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    message: str
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    end_column: int | None = None  # exclusive, 1-based; on the same line as `column`
    hint: str | None = None  # rendered as "help: ..."
    notes: tuple[str, ...] = field(default_factory=tuple)

    def location(self) -> str:
        parts = [self.file or "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def headline(self) -> str:
        return f"{self.location()}: {self.severity}: {self.message}"


class FldslError(Exception):
    """Raised by the compiler API with every error diagnostic found (warnings ride along)."""

    def __init__(self, diagnostics: Iterable[Diagnostic], sources: Mapping[str, str] | None = None):
        self.diagnostics = list(diagnostics)
        self.sources = dict(sources or {})
        # Set by the checker when only flow checks failed: the checked program without the refused flows
        # (fldsl.compiler.ir.Program) and the refused flows as dicts {src, dst, tensor, message}.
        self.program: object | None = None
        self.violations: list[dict[str, str]] = []
        super().__init__(render(self.diagnostics, self.sources, color=False))

    def render(self, *, color: bool = False) -> str:
        return render(self.diagnostics, self.sources, color=color)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a misspelt name (case differences count as close), or None."""
    cands = sorted(set(candidates))
    lowered: dict[str, str] = {}
    for c in cands:
        lowered.setdefault(c.lower(), c)
    if name.lower() in lowered and lowered[name.lower()] != name:
        return lowered[name.lower()]
    matches = difflib.get_close_matches(name, cands, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[matches[0]] if matches else None


def suggest(kind: str, name: str, candidates: Iterable[str]) -> tuple[str, str | None]:
    """``("unknown party `shp`; did you mean `shop`?", hint)`` for any name kind."""
    cands = sorted(set(candidates))
    best = did_you_mean(name, cands)
    msg = f"unknown {kind} `{name}`"
    if best is not None:
        return f"{msg}; did you mean `{best}`?", None
    if cands:
        shown = ", ".join(f"`{c}`" for c in cands[:8]) + (", ..." if len(cands) > 8 else "")
        return msg, f"known {kind}s: {shown}"
    return msg, None


def suggest_in(owner: str, kind: str, name: str, candidates: Iterable[str]) -> tuple[str, str | None]:
    """``("data set `x` has no field `spars`; did you mean `sparse`?", hint)``."""
    cands = sorted(set(candidates))
    best = did_you_mean(name, cands)
    msg = f"{owner} has no {kind} `{name}`"
    if best is not None:
        return f"{msg}; did you mean `{best}`?", None
    if cands:
        shown = ", ".join(f"`{c}`" for c in cands[:8]) + (", ..." if len(cands) > 8 else "")
        return msg, f"its {kind}s: {shown}"
    return msg, None


def _caret_line(text: str, column: int, end_column: int | None) -> str:
    # Expand tabs the same way in the caret line so the caret lands under the right character.
    prefix = "".join("\t" if ch == "\t" else " " for ch in text[: column - 1])
    width = max(1, (end_column or column + 1) - column)
    width = min(width, max(1, len(text) - column + 1))
    return prefix + "^" + "~" * (width - 1)


def render_one(d: Diagnostic, sources: Mapping[str, str], *, color: bool = False) -> str:
    red, bold, cyan, reset = ("\x1b[31m", "\x1b[1m", "\x1b[36m", "\x1b[0m") if color else ("",) * 4
    sev = d.severity if not color else f"{red if d.severity == 'error' else cyan}{d.severity}{reset}"
    out = [f"{bold}{d.location()}{reset}: {sev}: {bold}{d.message}{reset}"]
    src = sources.get(d.file or "")
    if src is not None and d.line is not None:
        lines = src.splitlines()
        if 1 <= d.line <= len(lines):
            text = lines[d.line - 1]
            gutter = f"{d.line:>4} | "
            out.append(gutter + text)
            if d.column is not None:
                out.append(" " * (len(gutter) - 2) + "| " + _caret_line(text, d.column, d.end_column))
    out.extend(f"  note: {n}" for n in d.notes)
    if d.hint:
        out.append(f"  help: {d.hint}")
    return "\n".join(out)


def render(
    diags: Iterable[Diagnostic], sources: Mapping[str, str] | None = None, *, color: bool = False
) -> str:
    """All diagnostics in order, then a one-line count of errors and warnings."""
    diags = list(diags)
    sources = sources or {}
    blocks = [render_one(d, sources, color=color) for d in diags]
    n_err = sum(d.severity == "error" for d in diags)
    n_warn = sum(d.severity == "warning" for d in diags)
    if n_err or n_warn:
        parts = []
        if n_err:
            parts.append(f"{n_err} error{'s' if n_err != 1 else ''}")
        if n_warn:
            parts.append(f"{n_warn} warning{'s' if n_warn != 1 else ''}")
        blocks.append(", ".join(parts))
    return "\n".join(blocks)
