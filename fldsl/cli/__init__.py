"""The ``fldsl`` command line (click).

One module per command group keeps each job small; commands import heavy modules (TensorFlow, gRPC)
lazily inside their functions so ``fldsl check`` stays fast.

Exit codes (documented in README "Exit codes"):
  0 ok · 1 run failed (a node failed, training error) · 2 input error (bad .flp, bad data, bad flags)
  3 trust failure (attestation / peer refused / tampered sealed file) · 4 environment problem
  (missing tool such as Graphviz `dot` or Gramine) · 130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import importlib

import click

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_INPUT = 2
EXIT_TRUST = 3
EXIT_ENV = 4
EXIT_INTERRUPTED = 130


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


class _LazyGroup(click.Group):
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
        return mod.command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fldsl")
def main() -> None:
    """fldsl: declarative confidential federated learning.

    Write a .flp pipeline, then `fldsl check`, `fldsl compile`, `fldsl graph` and `fldsl run` it.
    """
