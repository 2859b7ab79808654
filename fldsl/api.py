"""The public Python API of the compiler: check, compile, the task graph, and load-or-compile.

Every expected failure raises :class:`fldsl.diagnostics.FldslError` carrying diagnostics (rendered by the
CLI with file:line:col, the source line and a caret).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import networkx as nx

from fldsl.compiler.emit import CompileResult, EmitError
from fldsl.compiler.ir import Program
from fldsl.diagnostics import Diagnostic, FldslError

__all__ = [
    "CompileResult",
    "Program",
    "check",
    "check_source",
    "compile_pipeline",
    "load_or_compile",
    "task_graph",
]


# A pipeline is a page of text; anything much larger is not one (and /dev/zero never ends).
MAX_SOURCE_BYTES = 1 << 20


def _read_source(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SOURCE_BYTES + 1)
        if len(data) > MAX_SOURCE_BYTES:
            raise FldslError([Diagnostic(
                "error", f"larger than {MAX_SOURCE_BYTES // 1024} KiB: not a .flp pipeline", str(path))])
        return data.decode("utf-8")
    except FileNotFoundError:
        raise FldslError([Diagnostic("error", "file not found", str(path))]) from None
    except IsADirectoryError:
        raise FldslError([Diagnostic("error", "is a directory, not a .flp file", str(path))]) from None
    except UnicodeDecodeError as e:
        raise FldslError(
            [Diagnostic("error", f"not UTF-8 text ({e.reason} at byte {e.start})", str(path))]
        ) from None
    except OSError as e:
        raise FldslError([Diagnostic("error", f"cannot read: {e.strerror}", str(path))]) from None


def check_source(
    source: str, file: str = "<input>", params: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Program:
    """Parse and check ``source``; relative data paths resolve against ``base_dir`` (then the cwd)."""
    from fldsl.compiler.check import Checker
    from fldsl.compiler.parse import parse

    module = parse(source, file)
    return Checker(module, source, file, base_dir or Path.cwd(), dict(params or {})).run()


def check(path: str | Path, params: Mapping[str, str] | None = None) -> Program:
    """Check a ``.flp`` file (``params``: ``--set`` overrides as strings)."""
    path = Path(path)
    return check_source(_read_source(path), str(path), params, path.resolve().parent)


def compile_pipeline(
    path: str | Path,
    out_dir: str | Path | None = None,
    params: Mapping[str, str] | None = None,
    target: str | None = None,
    owner_keys: Mapping[str, str] | None = None,
    *,
    party: str | None = None,
    expose: str | None = None,
    addresses: str | Path | None = None,
    image: str | None = None,
) -> CompileResult:
    """Check and emit ``build/<pipeline>/`` (or ``out_dir``); ``target`` ("kubernetes" or "compose") also
    writes ``deploy/<target>/<party>/`` for ``party`` (every party without one), with ``expose``
    (kubernetes: clusterip, nodeport, loadbalancer), the parties' agreed ``addresses`` file and the
    ``image`` the nodes run (see :mod:`fldsl.compiler.deploy`). ``owner_keys``: party -> the model owner's
    public key PEM; the party's exporting nodes also write their model encrypted to it
    (``Plan.export_recipient``)."""
    from fldsl.compiler.emit import emit

    path = Path(path)
    if target is None:
        given = [f for f, v in (("--party", party), ("--expose", expose), ("--addresses", addresses),
                                ("--image", image)) if v is not None]
        if given:
            raise FldslError([Diagnostic("error", f"{', '.join(given)} only with --target kubernetes|compose",
                                         str(path))])
    source = _read_source(path)
    program = check_source(source, str(path), params, path.resolve().parent)
    if owner_keys:
        program.set_owner_keys(_owner_keys(program, owner_keys, str(path)))
    deploy = None
    if target is not None:  # checked before anything is written
        from fldsl.compiler.deploy import DeployError, deploy_options

        try:
            deploy = deploy_options(program, target, party=party, expose=expose, addresses=addresses,
                                    image=image)
        except DeployError as e:
            raise FldslError([Diagnostic("error", str(e), str(path), hint=e.hint)]) from None
    out = Path(out_dir) if out_dir is not None else Path("build") / program.pipeline
    try:
        result = emit(program, source, out, str(path))
        if deploy is not None:
            from fldsl.compiler.deploy import DeployError, write_deploy

            try:
                deployed = write_deploy(program, result.build_dir, deploy, digest=result.digest)
            except DeployError as e:
                raise FldslError([Diagnostic("error", str(e), str(path), hint=e.hint)]) from None
            result.files = sorted([*result.files, *deployed.files])
            notes = [Diagnostic("warning", n, str(path)) for n in deployed.notes]
            result.warnings = [*result.warnings, *notes]
        return result
    except EmitError as e:
        raise FldslError([Diagnostic("error", str(e), str(path))]) from None
    except OSError as e:
        raise FldslError(
            [Diagnostic("error", f"cannot write the build directory {out}: {e}", str(path))]
        ) from None


def _owner_keys(program: Program, keys: Mapping[str, str], file: str) -> dict[str, str]:
    """Check ``--owner-key`` parties (they must export a model) and keys; canonical PEM per party."""
    from fldsl.compiler.lower import exporting_parties
    from fldsl.diagnostics import did_you_mean
    from fldsl.runtime.owner_export import OwnerKeyError, public_key_pem

    exporting = exporting_parties(program)
    parties = [p.name for p in program.parties]
    diags: list[Diagnostic] = []
    out: dict[str, str] = {}
    for party, pem in sorted(keys.items()):
        if party not in parties:
            best = did_you_mean(party, parties)
            msg = f"--owner-key: no party `{party}` in pipeline {program.pipeline}"
            diags.append(Diagnostic("error", msg, file, hint=f"did you mean `{best}`?" if best else None))
        elif party not in exporting:
            diags.append(Diagnostic(
                "error", f"--owner-key: party `{party}` exports no model", file,
                hint="parties that export one: " + (", ".join(sorted(exporting)) or "none")))
        else:
            try:
                out[party] = public_key_pem(pem, f"--owner-key {party}")
            except OwnerKeyError as e:
                diags.append(Diagnostic("error", str(e), file))
    if diags:
        raise FldslError(diags)
    return out


def task_graph(program: Program) -> nx.DiGraph:
    from fldsl.compiler.lower import task_graph as _tg

    return _tg(program)


def load_or_compile(path_or_build_dir: str | Path, params: Mapping[str, str] | None = None) -> Path:
    """A build directory as is; a ``.flp`` compiled to ``build/<pipeline>/`` first."""
    p = Path(path_or_build_dir)
    if p.is_dir():
        if not (p / "pipeline.json").is_file():
            raise FldslError(
                [
                    Diagnostic(
                        "error",
                        "not a build directory (no pipeline.json); pass a .flp file or run `fldsl compile`",
                        str(p),
                    )
                ]
            )
        if params:
            raise FldslError([Diagnostic("error", "--set only applies when compiling a .flp file", str(p))])
        return p
    return compile_pipeline(p, params=params).build_dir
