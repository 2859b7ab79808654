"""``--json`` for every ``fldsl`` command: one JSON document (or JSON lines) on stdout, errors included.

Why one module: every command must behave the same under ``--json`` — a document with ``command``, ``ok`` and
``exit_code``, the same exit code as without ``--json``, and errors as objects (compiler diagnostics with
file/line/column/message/hint) on stdout instead of text on stderr. Commands that know their result's shape
write it with :func:`emit` (or stream it with :func:`emit_line`); for the others, the group in
``fldsl.cli`` captures what they print and wraps it with :func:`wrap_captured`, so a command added later
speaks JSON without extra work.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import IO, Any, NoReturn

import click

from fldsl.diagnostics import Diagnostic, FldslError

# The state of this invocation: a context variable, not click's Context.meta, because the group sets it before
# click has made the command's context (and a nested invocation, in tests, must not see an outer one's).
_STATE: ContextVar[dict[str, Any] | None] = ContextVar("fldsl_cli_output", default=None)
JSON_HELP = "Print one JSON document on stdout (errors included) instead of text; same exit codes."
_JSON = "fldsl.json"
_STDOUT = "fldsl.stdout"
_EMITTED = "fldsl.emitted"
_COMMAND = "fldsl.command"


def wants_json(args: Iterable[str]) -> bool:
    """``--json`` among a command line's options (not after ``--``, where it would be an argument)."""
    for a in args:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


def begin(stdout: IO[str], command: str) -> object:
    """JSON mode for this invocation; ``stdout`` is the real one (the group captures ``sys.stdout``).
    Returns the token :func:`end` takes."""
    return _STATE.set({_JSON: True, _STDOUT: stdout, _EMITTED: False, _COMMAND: command})


def end(token: object) -> None:
    _STATE.reset(token)  # type: ignore[arg-type]


def _meta() -> dict[str, Any]:
    return _STATE.get() or {}


def is_json() -> bool:
    return bool(_meta().get(_JSON))


def emitted() -> bool:
    return bool(_meta().get(_EMITTED))


def _write(doc: Mapping[str, Any], indent: int | None) -> None:
    meta = _meta()
    out: IO[str] = meta.get(_STDOUT) or sys.stdout
    out.write(json.dumps(doc, sort_keys=True, indent=indent, default=str) + "\n")
    out.flush()
    meta[_EMITTED] = True


def document(exit_code: int, /, **fields: Any) -> dict[str, Any]:
    """The common head of every document (which command, whether it succeeded, its exit code) over the
    command's own fields."""
    return {**fields, "command": _meta().get(_COMMAND, ""), "ok": exit_code == 0, "exit_code": exit_code}


def emit(exit_code: int, /, **fields: Any) -> None:
    """The command's one JSON document (``exit_code`` is the code the command then exits with)."""
    _write(document(exit_code, **fields), indent=2)


def emit_line(event: str, **fields: Any) -> None:
    """One JSON line of a streaming command (a server's address, progress); its last line says ``done``."""
    _write({"command": _meta().get(_COMMAND, ""), "event": event, **fields}, indent=None)


def diagnostic_json(d: Diagnostic) -> dict[str, Any]:
    return {"severity": d.severity, "file": d.file, "line": d.line, "column": d.column,
            "end_column": d.end_column, "message": d.message, "hint": d.hint, "notes": list(d.notes)}


def fail(code: int, message: str, *, hint: str | None = None) -> NoReturn:
    """An expected failure: ``error: message`` on stderr, or the error document under ``--json``; exit."""
    if is_json():
        emit(code, error={"message": message, "hint": hint}, diagnostics=[])
    else:
        click.echo(f"error: {message}" + (f"\n  help: {hint}" if hint else ""), err=True)
    sys.exit(code)


def fail_diagnostics(e: FldslError, code: int) -> NoReturn:
    """A compile error: rendered with carets on stderr, or the diagnostics as objects under ``--json``."""
    if is_json():
        first = e.errors[0] if e.errors else (e.diagnostics[0] if e.diagnostics else None)
        error = {"message": first.headline() if first else str(e), "hint": first.hint if first else None}
        emit(code, error=error, diagnostics=[diagnostic_json(d) for d in e.diagnostics])
    else:
        click.echo(e.render(color=sys.stderr.isatty()), err=True)
    sys.exit(code)


def wrap_captured(exit_code: int, stdout: str, stderr: str, error: str | None = None) -> None:
    """The document of a command that printed text: its lines, and its error where it failed."""
    lines = stdout.splitlines()
    messages = stderr.splitlines()
    fields: dict[str, Any] = {"output": lines, "messages": messages}
    if exit_code != 0:
        text = error or "\n".join(m for m in messages if m.strip()) or f"exit code {exit_code}"
        fields["error"] = {"message": text.removeprefix("error: ").removeprefix("Error: "), "hint": None}
        fields["diagnostics"] = []
    _write(document(exit_code, **fields), indent=2)
