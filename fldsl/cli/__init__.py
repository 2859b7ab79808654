"""The ``fldsl`` command line (click).

One module per command group keeps each job small; commands import heavy modules (TensorFlow, gRPC)
lazily inside their functions so ``fldsl check`` stays fast.

Exit codes (documented in README "Exit codes"):
  0 ok · 1 run failed (a node failed, training error) · 2 input error (bad .flp, bad data, bad flags)
  3 trust failure (attestation / peer refused / tampered sealed file) · 4 environment problem
  (missing tool such as Graphviz `dot` or Gramine) · 130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from typing import Any, TextIO

import click

from fldsl.exitcodes import (  # re-exported: the commands import them from here
    EXIT_ENV,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_TRUST,
)

__all__ = ["EXIT_ENV", "EXIT_INPUT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUN_FAILED", "EXIT_TRUST", "main",
           "parse_sets"]


def parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    """``--set NAME=VALUE`` items -> dict; a malformed item is a usage error (exit 2)."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--set expects NAME=VALUE, got `{item}`")
        out[key.strip()] = value
    return out


# name -> module under fldsl.cli that defines a click command or group called `command`.
_COMMANDS = {
    "check": "check",
    "compile": "compile_cmd",
    "graph": "graph",
    "run": "run",
    "trust": "trust",
    "inspect": "inspect_cmd",
    "model": "model",
    "predict": "predict",
    "bench": "bench",
    "data": "data",
    "keys": "keys",
    "audit": "audit",
}


def _with_json(cmd: click.Command) -> click.Command:
    """Give a command (every command of a group) a ``--json`` flag where it has none of its own: the group
    decides JSON mode from the command line before click parses it (``_LazyGroup.main``)."""
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _with_json(sub)
    elif not any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option)):
        from fldsl.cli.output import JSON_HELP

        cmd.params.append(click.Option(["--json"], is_flag=True, expose_value=False, help=JSON_HELP))
    return cmd


class _Tee(io.StringIO):
    """Captures what a command writes to stderr for its JSON document and still shows it (a server's log)."""

    def __init__(self, through: TextIO) -> None:
        super().__init__()
        self.through = through

    def write(self, s: str) -> int:
        self.through.write(s)
        return super().write(s)

    def flush(self) -> None:
        self.through.flush()


def _exit_code(e: SystemExit) -> tuple[int, str | None]:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0, None
    return EXIT_RUN_FAILED, str(e.code)  # sys.exit("message"): Python's own convention, exit 1


class _LazyGroup(click.Group):
    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        from fldsl.cli import output

        argv = list(sys.argv[1:] if args is None else args)
        if not output.wants_json(argv):
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        real_out = sys.stdout
        token = output.begin(real_out, self._command_name(argv))
        captured, err = io.StringIO(), _Tee(sys.stderr)
        error: str | None = None
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(err):
                try:
                    super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
                    code = EXIT_OK
                except click.ClickException as e:  # usage errors and the like, exit 2 as without --json
                    code, error = e.exit_code, e.format_message()
                except click.exceptions.Exit as e:
                    code = e.exit_code
                except click.Abort:
                    code, error = EXIT_RUN_FAILED, "aborted"
                except SystemExit as e:
                    code, error = _exit_code(e)
            if not output.emitted():
                output.wrap_captured(code, captured.getvalue(), err.getvalue(), error)
        finally:
            output.end(token)
        if standalone_mode:
            sys.exit(code)
        return code

    def _command_name(self, argv: list[str]) -> str:
        """``trust init`` from ``trust init --party a --json``: the leading words that name commands."""
        words: list[str] = []
        group: click.Command | None = self
        for a in argv:
            if not isinstance(group, click.Group):
                break
            ctx = click.Context(group)
            group = group.get_command(ctx, a)
            if group is None:
                break
            words.append(a)
        return " ".join(words)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        mod_name = _COMMANDS.get(name)
        if mod_name is None:
            return None
        try:
            mod = importlib.import_module(f"fldsl.cli.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name == f"fldsl.cli.{mod_name}":
                return None  # command not built yet
            raise
        return _with_json(mod.command)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fldsl")
def main() -> None:
    """fldsl: declarative confidential federated learning.

    Write a .flp pipeline, then `fldsl check`, `fldsl compile`, `fldsl graph` and `fldsl run` it.
    """
