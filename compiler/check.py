"""Semantic checks: AST -> checked IR (``fldsl.compiler.ir.Program``).

Resolves names (parameters, stdlib modules, parties, nodes, data sets and their fields, tensors, ops and
their parameters), infers every tensor's shape and dtype, checks the partition rules of the scenario, then
derives the cross-node flows and checks each against the trust block's ``allow`` rules (information flow:
every value carries the private sources it depends on, see :mod:`fldsl.compiler.flows`).

Errors are collected (as many as can be found in one pass) and raised together as one ``FldslError``.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fldsl.artifacts import (
    COLUMN_TYPES,
    ColumnSpec,
    DataSpec,
    LossSpec,
    MissingSpec,
    OpCall,
    OptimizerSpec,
    ScaleSpec,
    TensorSpec,
    TrainSpec,
    ValidationSpec,
)
from fldsl.compiler import ast
from fldsl.compiler.ir import IRDataset, IRParty, IRTrust, Program
from fldsl.compiler.values import BAD, PARAM_TYPES, Env, convert_param, describe, evaluate
from fldsl.diagnostics import Diagnostic, FldslError, did_you_mean, suggest, suggest_in
from fldsl.stdlib import signatures as sig

STD_MODULES = {"std.models": sorted(sig.OPS)}
MAX_FAMILY = 256


class _Fatal(Exception):
    """Stop checking: later phases would only report follow-on errors."""


@dataclass
class Tensor:
    """A value of the model: a data set field or an op output."""

    name: str  # ref as used in plans: "impressions.sparse" or "act1"
    spec: TensorSpec
    party: str | None  # where it is produced (vertical); None = on every worker
    sources: dict[str, list[str]]  # private source ("party.dataset.field", party may be "*") -> path
    trainable: bool  # has trainable parameters upstream (so a gradient flows back)
    raw: bool  # a data set field
    span: ast.Span
    op: str | None = None


@dataclass
class Party:
    name: str
    family: str | None
    index: int | None
    description: str | None
    nodes: list[str]  # node names
    node_families: dict[str, str]  # node name -> family ("worker1" -> "worker")
    span: ast.Span
    datasets: dict[str, IRDataset] = field(default_factory=dict)


@dataclass
class Rule:
    stmt: ast.AllowStmt
    src_party: str  # a party or family name
    src_node: str | None
    dst_party: str
    dst_node: str | None
    tensor: str
    as_spec: TensorSpec | None = None
    used: bool = False


class Checker:
    def __init__(self, module: ast.Module, source: str, file: str, base_dir: Path, overrides: dict[str, str]):
        self.m = module
        self.source = source
        self.file = file
        self.base_dir = base_dir
        self.overrides = overrides
        self.diags: list[Diagnostic] = []
        self.parties: dict[str, Party] = {}
        self.families: dict[str, list[str]] = {}
        self.tensors: dict[str, Tensor] = {}
        self.imported: set[str] = set()
        self.uses: list[str] = []
        self.ops: list[OpCall] = []
        self.param_counts: dict[str, int] = {}
        self.op_spans: dict[str, ast.Span] = {}
        self.scenario = "vertical"
        self.rules: list[Rule] = []
        self.missing_data_params: set[str] = set()
        self.poisoned: set[str] = set()  # tensors whose definition failed: uses are not reported again
        self.schemas: dict[int, list[ColumnSpec] | None] = {}  # schema block (by identity) -> its columns
        self.vocabularies: list[ast.Span] = []  # `vocabulary:` options (refused in horizontal pipelines)
        self.medians: list[ast.Span] = []  # `missing: median` fills (refused in horizontal pipelines)

    # --- reporting -------------------------------------------------------------------------------------
    def error(self, span: ast.Span | None, message: str, hint: str | None = None) -> None:
        self._add("error", span, message, hint)

    def warning(self, span: ast.Span | None, message: str, hint: str | None = None) -> None:
        self._add("warning", span, message, hint)

    def _add(self, sev: Any, span: ast.Span | None, message: str, hint: str | None) -> None:
        if span is None:
            self.diags.append(Diagnostic(sev, message, self.file, hint=hint))
        else:
            self.diags.append(
                Diagnostic(sev, message, self.file, span.line, span.column, span.single_line_end, hint)
            )

    def report(self, span: ast.Span, message: str, hint: str | None) -> None:
        self.error(span, message, hint)

    def unknown(self, span: ast.Span, kind: str, name: str, candidates: Any) -> None:
        msg, hint = suggest(kind, name, candidates)
        self.error(span, msg, hint)

    def unknown_in(self, span: ast.Span, owner: str, kind: str, name: str, candidates: Any) -> None:
        msg, hint = suggest_in(owner, kind, name, candidates)
        self.error(span, msg, hint)

    def loc(self, span: ast.Span) -> str:
        # Written into artifacts: the file name only, so builds do not depend on where the source lives.
        return f"{Path(self.file).name}:{span.line}:{span.column}"

    def fail_if_errors(self) -> None:
        if any(d.severity == "error" for d in self.diags):
            raise _Fatal

    # --- driver ----------------------------------------------------------------------------------------
    def run(self) -> Program:
        try:
            env = self.check_params()
            self.check_uses()
            # The loss decides the csv label dtype (float32 for mse), so peek at it before reading data.
            self.loss_name = next(
                (s.call.func.value for m in self.m.models for s in m.stmts if isinstance(s, ast.LossStmt)),
                None,
            )
            self.check_parties(env)
            self.check_partition_kind()
            self.check_fitted_vocabularies()
            self.fail_if_errors()
            self.check_partition_nodes()
            self.fail_if_errors()
            self.check_model(env)
            self.fail_if_errors()
            train = self.check_train(env)
            trust = self.check_trust(env)
            self.fail_if_errors()
            from fldsl.compiler.flows import FlowBuilder

            builder = FlowBuilder(self, train)
            flows = builder.build()  # information-flow errors are collected, not raised
            program = Program(
                pipeline=self.m.name.value,
                source_name=Path(self.file).name,
                source_sha256=hashlib.sha256(self.source.encode()).hexdigest(),
                params=dict(sorted(env.params.items())),
                uses=sorted(self.uses),
                scenario=self.scenario,  # type: ignore[arg-type]
                parties=[
                    IRParty(
                        name=p.name,
                        description=p.description,
                        family=p.family,
                        index=p.index,
                        nodes=[f"{p.name}.{n}" for n in p.nodes],
                    )
                    for p in self.parties.values()
                ],
                nodes=builder.nodes,
                datasets=[d for p in self.parties.values() for d in p.datasets.values()],
                ops=self.ops,
                param_counts=self.param_counts,
                loss=self.loss,
                train=train,
                alignment=builder.alignment,
                aggregation=builder.aggregation,
                sharding=builder.sharding,
                trust=trust,
                flows=flows,
            )
        except _Fatal:
            raise FldslError(self.diags, {self.file: self.source}) from None
        if any(d.severity == "error" for d in self.diags):
            # Only flow errors are left: the partial program (refused flows removed) and the refused flows
            # let `fldsl graph` draw the pipeline with the violations in red.
            err = FldslError(self.diags, {self.file: self.source})
            err.program = program
            err.violations = list(builder.violations)
            raise err
        program._warnings = [d for d in self.diags if d.severity == "warning"]
        return program

    # --- parameters and uses ---------------------------------------------------------------------------
    def check_params(self) -> Env:
        params: dict[str, Any] = {}
        types: dict[str, str] = {}
        for p in self.m.params:
            name, ptype = p.name.value, p.type.value
            if name in params:
                self.error(p.name.span, f"parameter `{name}` is declared twice")
                continue
            if ptype not in PARAM_TYPES:
                best = did_you_mean(ptype, PARAM_TYPES)
                self.error(
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
                self.error(d.span, f"default of `{name}` must be {_type_word(ptype)}, got {describe(d)}")
                params[name], types[name] = BAD, "bad"
                continue
            params[name] = float(d.value) if ptype == "float" else d.value  # type: ignore[arg-type]
            types[name] = ptype
        for key, raw in self.overrides.items():
            if types.get(key) == "bad":
                continue
            if key not in params:
                msg, hint = suggest("parameter", key, params)
                self.diags.append(
                    Diagnostic(
                        "error", f"--set {key}={raw}: {msg}", self.file, hint=hint or _no_params(params)
                    )
                )
                continue
            try:
                params[key] = convert_param(raw, types[key])
            except ValueError as e:
                self.diags.append(
                    Diagnostic(
                        "error", f"--set {key}={raw}: {e} (parameter `{key}` is {types[key]})", self.file
                    )
                )
        return Env(params, types)

    def check_uses(self) -> None:
        for u in self.m.uses:
            parts = [n.value for n in u.module]
            names = u.names
            if names is None:
                if len(parts) < 2:
                    self.error(
                        u.span, f"`use {'.'.join(parts)}` imports nothing", "write `use std.models.{mlp}`"
                    )
                    continue
                names = [u.module[-1]]
                parts = parts[:-1]
            mod = ".".join(parts)
            if mod not in STD_MODULES:
                self.unknown(
                    _join(u.module[0].span, u.module[len(parts) - 1].span), "module", mod, STD_MODULES
                )
                continue
            if mod not in self.uses:
                self.uses.append(mod)
            for n in names:
                if n.value not in STD_MODULES[mod]:
                    self.unknown_in(n.span, f"module `{mod}`", "name", n.value, STD_MODULES[mod])
                else:
                    self.imported.add(n.value)

    # --- parties, nodes, data --------------------------------------------------------------------------
    def check_parties(self, env: Env) -> None:
        if not self.m.parties:
            self.error(
                self.m.name.span, "the pipeline declares no party", "add `party NAME { node trainer }`"
            )
            raise _Fatal
        for pd in self.m.parties:
            members: list[tuple[str, int | None]]
            if pd.range is not None:
                r = pd.range
                if r.lo > r.hi or r.hi - r.lo >= MAX_FAMILY or r.lo < 0:
                    self.error(r.span, f"invalid range [{r.lo}..{r.hi}] (need 0 <= low <= high, at most 256)")
                    continue
                members = [(f"{pd.name.value}{k}", k) for k in range(r.lo, r.hi + 1)]
                if pd.name.value in self.families or pd.name.value in self.parties:
                    self.error(pd.name.span, f"party `{pd.name.value}` is declared twice")
                    continue
                self.families[pd.name.value] = [n for n, _ in members]
            else:
                members = [(pd.name.value, None)]
            nodes, node_fams = self._nodes(pd)
            for pname, idx in members:
                if pname in self.parties or (pname in self.families and idx is None):
                    self.error(pd.name.span, f"party `{pname}` is declared twice")
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
                self.parties[pname] = party
                for dd in pd.data:
                    if dd.name.value in party.datasets:
                        self.error(dd.name.span, f"data set `{dd.name.value}` is declared twice in `{pname}`")
                        continue
                    ds = self._dataset(dd, pname, env.child(idx))
                    if ds is not None:
                        party.datasets[dd.name.value] = ds

    def _nodes(self, pd: ast.PartyDecl) -> tuple[list[str], dict[str, str]]:
        names: list[str] = []
        fams: dict[str, str] = {}
        if not pd.nodes:
            self.error(pd.name.span, f"party `{pd.name.value}` declares no node", "add `node trainer` to it")
        for nd in pd.nodes:
            if nd.range is not None:
                r = nd.range
                if r.lo > r.hi or r.hi - r.lo >= MAX_FAMILY or r.lo < 0:
                    self.error(r.span, f"invalid range [{r.lo}..{r.hi}] (need 0 <= low <= high, at most 256)")
                    continue
                new = [f"{nd.name.value}{k}" for k in range(r.lo, r.hi + 1)]
                for n in new:
                    fams[n] = nd.name.value
            else:
                new = [nd.name.value]
            for n in new:
                if n in names:
                    self.error(nd.name.span, f"node `{n}` is declared twice in party `{pd.name.value}`")
                else:
                    names.append(n)
        return names, fams

    def _bind(
        self, call: ast.Call, params: tuple[sig.Param, ...], what: str, env: Env, tensor: Any = None
    ) -> dict[str, Any] | None:
        """Match a call's arguments to a signature; values evaluated, defaults filled."""
        out: dict[str, Any] = {}
        ok = True
        positional = True
        names = [p.name for p in params]
        for i, a in enumerate(call.args):
            if a.name is None:
                if not positional:
                    self.error(a.span, f"positional argument after a named one in {what}")
                    ok = False
                    continue
                if i >= len(params):
                    self.error(a.span, f"{what} takes at most {len(params)} positional argument(s)")
                    ok = False
                    continue
                p = params[i]
            else:
                positional = False
                named = next((q for q in params if q.name == a.name.value), None)
                if named is None:
                    self.unknown_in(a.name.span, what, "parameter", a.name.value, names)
                    ok = False
                    continue
                p = named
            if p.name in out:
                self.error(a.span, f"parameter `{p.name}` of {what} is given twice")
                ok = False
                continue
            if p.is_tensor:
                if p.type == "tensor?" and isinstance(a.value, ast.Literal_) and a.value.kind == "none":
                    v = None
                else:
                    v = tensor(a.value) if tensor else BAD
            else:
                v = evaluate(a.value, p.type, env, f"`{p.name}` of {what}", self.report, p.choices)
            if v is BAD:
                ok = False
            out[p.name] = v
        for p in params:
            if p.name not in out:
                if p.required:
                    self.error(call.span, f"{what} needs `{p.name}`", f"add `{p.name}: ...` to the call")
                    ok = False
                else:
                    out[p.name] = p.default
        return out if ok else None

    def _dataset(self, dd: ast.DataDecl, party: str, env: Env) -> IRDataset | None:
        call = dd.reader
        rname = call.func.value
        reader = sig.READERS.get(rname)
        if reader is None:
            self.unknown(call.func.span, "data reader", rname, sig.READERS)
            return None
        env.used_params = set()
        args = self._bind(call, reader.params, f"`{rname}(...)`", env)
        if args is None:
            return None
        span = self.loc(dd.span)
        name = dd.name.value
        if rname in ("csv", "parquet"):
            if dd.schema is not None:
                return self._csv_declared(dd, dd.schema, party, args, env, span)
            return self._csv(dd, party, args, env, span)
        if dd.schema is not None:
            self.error(
                dd.schema.span,
                f"a schema block describes a csv or Parquet file; `{rname}(...)` generates its own columns",
                "remove the block",
            )
            return None
        for k in ("rows", "parts", "buckets"):
            if k in args and args[k] <= 0:
                self.error(call.span, f"`{k}` of `{rname}(...)` must be positive, got {args[k]}")
                return None
        if rname == "criteo" and not 0 <= args["part"] < args["parts"]:
            self.error(call.span, f"`part` must be in 0..{args['parts'] - 1}, got {args['part']}")
            return None
        if rname == "wide_n_deep" and (args["features"] <= 0 or not 0 < args["overlap"] <= 1):
            self.error(call.span, "`features` must be positive and `overlap` in (0, 1]")
            return None
        fields = reader.fields(args)
        spec = DataSpec(
            name=name,
            reader=rname,  # type: ignore[arg-type]
            params=dict(sorted(args.items())),
            id_column=reader.id_column,
            label_column="label" if "label" in fields else None,
            fields=fields,
        )
        rows = -(-args["rows"] // args["parts"]) if rname == "criteo" else args["rows"]
        return IRDataset(party=party, spec=spec, rows=rows, span=span)

    def _csv(
        self, dd: ast.DataDecl, party: str, args: dict[str, Any], env: Env, span: str
    ) -> IRDataset | None:
        call = dd.reader
        raw = args["path"]
        path = Path(raw)
        candidates = [path] if path.is_absolute() else [self.base_dir / path, Path.cwd() / path]
        found = next((c for c in candidates if c.is_file()), None)
        arg_span = call.args[0].span if call.args else call.span
        if found is None:
            path_params = [p for p in sorted(env.used_params) if env.param_types.get(p) == "path"]
            where = " or ".join(str(c.resolve()) for c in candidates)
            if path_params:
                # One line per parameter: the other files under that folder are missing for the same reason.
                if path_params[0] in self.missing_data_params:
                    return None
                self.missing_data_params.add(path_params[0])
                self.error(
                    arg_span,
                    f"data file not found: {raw} (looked for {where}); "
                    f"set parameter `{path_params[0]}` to the folder that holds it: "
                    f"`--set {path_params[0]}=DIR`",
                )
            else:
                self.error(arg_span, f"data file not found: {raw} (looked for {where})")
            return None
        found = found.resolve()
        if call.func.value == "parquet":
            parquet = _parquet_columns(found)
            if isinstance(parquet, str):
                self.error(arg_span, f"cannot read data file {found}: {parquet}")
                return None
            header, rows = parquet
        else:
            try:
                with found.open("r", encoding="utf-8", newline="") as f:
                    header_line = f.readline()
                    rows = sum(1 for line in f if line.strip())
            except (OSError, UnicodeDecodeError) as e:
                self.error(arg_span, f"cannot read data file {found}: {e}")
                return None
            header = [c.strip() for c in next(csv.reader([header_line.strip()]), [])]
            if not header_line.strip():
                self.error(arg_span, f"{found}: empty file (a CSV needs a header line)")
                return None
        id_col, label_col = args["id"], args["label"]
        ok = True
        for what, col in (("id", id_col), ("label", label_col)):
            if col is not None and col not in header:
                best = did_you_mean(col, header)
                self.error(
                    _arg_span(call, what) or call.span,
                    f"{what} column `{col}` is not in the header of {found.name}"
                    + (f"; did you mean `{best}`?" if best else ""),
                    None
                    if best
                    else f"columns: {', '.join(header[:12])}{', ...' if len(header) > 12 else ''}",
                )
                ok = False
        if not ok:
            return None
        pool = [c for c in header if c not in (id_col, label_col)]
        features: list[str] = []
        for pat in args["columns"]:
            hits = [c for c in pool if fnmatch.fnmatchcase(c, pat)]
            if not hits:
                self.error(
                    _arg_span(call, "columns") or call.span,
                    f"column pattern `{pat}` matches no column of {found.name}",
                    f"columns: {', '.join(pool[:12])}{', ...' if len(pool) > 12 else ''}",
                )
                return None
            features += [c for c in hits if c not in features]
        spec = DataSpec(
            name=dd.name.value,
            reader=call.func.value,  # type: ignore[arg-type]  # csv or parquet (the caller's test)
            path=str(found),
            id_column=id_col,
            label_column=label_col,
            feature_columns=features,
            fields=self._csv_fields(len(features), label_col),
        )
        return IRDataset(party=party, spec=spec, rows=rows, span=span)

    def _csv_declared(
        self, dd: ast.DataDecl, block: ast.SchemaBlock, party: str, args: dict[str, Any], env: Env, span: str
    ) -> IRDataset | None:
        """A csv data set with a schema block: built from the declaration alone. The file is never opened
        (each party compiles without the others' data) and its path stays as declared, so every party's
        build is byte-identical; the node checks its file against the schema when it starts."""
        call = dd.reader
        id_col, label_col = args["id"], args["label"]
        declared = self._schema_columns(dd, block, id_col, label_col, env)
        bound = self._rows_bound(block, env)
        if declared is None or bound is None:
            return None
        names = [c.name for c in declared]
        width = {c.name: c.width for c in declared}
        features: list[str] = []
        for pat in args["columns"]:
            hits = [c for c in names if fnmatch.fnmatchcase(c, pat)]
            if not hits:
                self.error(
                    _arg_span(call, "columns") or call.span,
                    f"column pattern `{pat}` matches no column declared in the schema block of "
                    f"`{dd.name.value}`",
                    f"declared: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}",
                )
                return None
            features += [c for c in hits if c not in features]
        spec = DataSpec(
            name=dd.name.value,
            reader=call.func.value,  # type: ignore[arg-type]  # csv or parquet (the caller's test)
            path=args["path"],
            id_column=id_col,
            label_column=label_col,
            feature_columns=features,
            fields=self._csv_fields(sum(width[c] for c in features), label_col),
            columns=declared,
            max_rows=bound,
        )
        return IRDataset(party=party, spec=spec, rows=bound, span=span)

    def _schema_columns(
        self, dd: ast.DataDecl, block: ast.SchemaBlock, id_col: str | None, label_col: str | None, env: Env
    ) -> list[ColumnSpec] | None:
        """The declared columns, in order, or None after reporting every problem in the block. A party
        family shares one block: it is checked (and reported) once, not once per member."""
        key = id(block)
        if key in self.schemas:
            return self.schemas[key]
        out: list[ColumnSpec] = []
        first: dict[str, ast.Span] = {}
        ok = True
        for cd in block.columns:
            ctype = cd.type.value
            if ctype not in COLUMN_TYPES:
                self.unknown(cd.type.span, "column type", ctype, COLUMN_TYPES)
                ok = False
                continue
            options = self._column_options(cd, env)
            if options is None:
                ok = False
                continue
            for col in cd.columns:
                name = col.value
                problem: tuple[str, str | None] | None = None
                if not name.strip():
                    problem = ("a column name cannot be empty", None)
                elif name != name.strip():
                    problem = (
                        f"column name {json.dumps(name)} starts or ends with a space",
                        "header cells are read without surrounding spaces: drop them from the name",
                    )
                elif name in first:
                    prev = first[name]
                    problem = (
                        f"column `{name}` is declared twice",
                        f"first declared at line {prev.line}, column {prev.column}; remove one",
                    )
                elif name == id_col:
                    problem = (
                        f"`{name}` is the id column (`id: {name}`); it cannot also be a feature column",
                        "remove it from the block: ids align rows, they are never fed to the model",
                    )
                elif name == label_col:
                    problem = (
                        f"`{name}` is the label column (`label: {name}`); a label cannot be a feature column",
                        "remove it from the block: the model would be given the answer it should predict",
                    )
                if problem is not None:
                    self.error(col.span, problem[0], problem[1])
                    ok = False
                    continue
                first[name] = col.span
                out.append(ColumnSpec(name=name, type=ctype, **options))
        if ok and not block.columns:
            self.error(
                block.span,
                f"the schema block of `{dd.name.value}` declares no column",
                "add a line such as `numeric x1, x2` (`fldsl data describe FILE` prints the block)",
            )
            ok = False
        result = out if ok else None
        self.schemas[key] = result
        return result

    def _column_options(self, cd: ast.ColumnDecl, env: Env) -> dict[str, Any] | None:
        """The preprocessing of one schema line (``missing:``, ``scale:``, ``vocabulary:``, ``hash:``) as
        ColumnSpec fields, or None after reporting every problem with them."""
        ctype = cd.type.value
        numeric = ctype in ("numeric", "integer")
        out: dict[str, Any] = {}
        seen: dict[type, ast.Span] = {}
        ok = True

        def bad(span: ast.Span, message: str, hint: str | None = None) -> None:
            nonlocal ok
            self.error(span, message, hint)
            ok = False

        def number(expr: ast.Expr, what: str) -> float | None:
            v = evaluate(expr, "float", env, what, self.report)
            if v is BAD:
                nonlocal ok
                ok = False
                return None
            return float(v)

        def count(expr: ast.Expr, what: str, most: int) -> int | None:
            v = evaluate(expr, "int", env, what, self.report)
            if v is BAD:
                nonlocal ok
                ok = False
                return None
            if not 1 <= v <= most:
                bad(expr.span, f"{what} must be between 1 and {most:,}, got {v}")
                return None
            return int(v)

        for opt in cd.options:
            word = {ast.MissingOpt: "missing", ast.ScaleOpt: "scale", ast.VocabularyOpt: "vocabulary",
                    ast.HashOpt: "hash", ast.BucketizeOpt: "bucketize"}[type(opt)]
            if type(opt) in seen:
                prev = seen[type(opt)]
                bad(opt.span, f"`{word}:` is given twice on one line",
                    f"first given at line {prev.line}, column {prev.column}; keep one")
                continue
            seen[type(opt)] = opt.span
            if isinstance(opt, ast.MissingOpt):
                token = str(opt.token.value) if opt.token is not None else None
                if opt.token is not None and token is not None and (token != token.strip() or token == ""):
                    bad(opt.token.span, f"missing-value token {json.dumps(token)} is empty or starts or "
                        "ends with a space",
                        "cells are compared without surrounding spaces, and an empty cell is always missing")
                    continue
                if not numeric:
                    if opt.fill is not None:
                        bad(opt.fill.span, f"`{opt.fill.value}` fills numbers; a `category` column has no "
                            "such fill: a missing value is a category of its own (the empty value)",
                            'declare only the token, e.g. `missing: "?"`')
                        continue
                    if opt.indicator is not None:
                        bad(opt.indicator.span, "`indicator` is for numeric and integer columns: a missing "
                            "category value is already a category of its own (the empty value)",
                            "remove `indicator`")
                        continue
                    out["missing"] = MissingSpec(token=token)
                    continue
                if opt.fill is None:
                    bad(opt.span, "`missing:` on a numeric or integer line needs a fill: `mean`, `median` or "
                        "`constant N`", 'e.g. `missing: "?" mean` or `missing: constant 0 indicator`')
                    continue
                value = number(opt.value, "the fill constant") if opt.value is not None else None
                if opt.value is not None and value is None:
                    continue
                if ctype == "integer" and value is not None and not value.is_integer():
                    bad(opt.value.span, f"the fill constant of an integer column must be a whole number, "  # type: ignore[union-attr]
                        f"got {value}")
                    continue
                out["missing"] = MissingSpec(token=token, fill=opt.fill.value, value=value,  # type: ignore[arg-type]
                                             indicator=opt.indicator is not None)
                if opt.fill.value == "median":
                    self.medians.append(opt.fill.span)
            elif isinstance(opt, ast.ScaleOpt):
                if not numeric:
                    bad(opt.span, "`scale:` is for numeric and integer columns; a category becomes one-hot "
                        "columns of 0 and 1", "remove `scale:` from this line")
                    continue
                lo = number(opt.lo, "the lower clip bound") if opt.lo is not None else None
                hi = number(opt.hi, "the upper clip bound") if opt.hi is not None else None
                if opt.kind.value == "clip":
                    if lo is None or hi is None:
                        continue
                    if not lo < hi:
                        bad(opt.span, f"`clip(lo, hi)` needs lo < hi, got clip({lo:g}, {hi:g})")
                        continue
                out["scale"] = ScaleSpec(kind=opt.kind.value, lo=lo, hi=hi)  # type: ignore[arg-type]
            elif isinstance(opt, ast.VocabularyOpt):
                if numeric:
                    bad(opt.span, f"`vocabulary:` is for `category` columns, not `{ctype}` ones",
                        "declare the columns as `category` to one-hot their values")
                    continue
                k = count(opt.top, "the vocabulary size", MAX_VOCABULARY)
                if k is not None:
                    out["vocabulary"] = k
                    self.vocabularies.append(opt.span)
            elif isinstance(opt, ast.BucketizeOpt):
                bounds = self._bucket_bounds(opt, ctype, env, bad)
                if bounds is not None:
                    out["buckets"] = bounds
            else:
                if numeric:
                    bad(opt.span, f"`hash:` is for `category` columns, not `{ctype}` ones",
                        "declare the columns as `category` to hash their values")
                    continue
                n = count(opt.buckets, "the number of hash buckets", MAX_VOCABULARY)
                if n is not None:
                    out["hash_buckets"] = n
        if ok and "buckets" in out and "scale" in out:
            bad(cd.span, "a line takes `bucketize:` or `scale:`, not both: the bucket's one-hot replaces the "
                "value, so a scale would change nothing", "keep one")
        if ok and ctype == "category":
            if "vocabulary" in out and "hash_buckets" in out:
                bad(cd.span, "a category line takes `vocabulary:` or `hash:`, not both",
                    "keep one: the feature columns are either the vocabulary's or the buckets'")
            elif "vocabulary" not in out and "hash_buckets" not in out:
                cols = ", ".join(_quoted(c.value) for c in cd.columns[:2])
                bad(cd.type.span, "a `category` line needs `vocabulary: top K` or `hash: N buckets`: the "
                    "number of feature columns it becomes is declared, so every party compiles the same "
                    "model", f"e.g. `category {cols} vocabulary: top 100`")
        return out if ok else None

    def _bucket_bounds(self, opt: ast.BucketizeOpt, ctype: str, env: Env,
                       bad: Callable[[ast.Span, str, str | None], None]) -> list[float] | None:
        """``bucketize: [b1, ..., bk]``: k strictly increasing finite boundaries (k + 1 one-hot columns:
        below b1, [b1, b2), ..., at or above bk; nothing fitted)."""
        if ctype == "category":
            bad(opt.span, "`bucketize:` is for numeric and integer columns; a category is already one-hot",
                "remove `bucketize:` from this line")
            return None
        v = evaluate(opt.bounds, "list[float]", env, "the bucket boundaries", self.report)
        if v is BAD:  # reported by evaluate (the check fails on it)
            return None
        bounds = [float(x) for x in v]
        if not 1 <= len(bounds) <= MAX_VOCABULARY:
            bad(opt.bounds.span, f"`bucketize:` needs between 1 and {MAX_VOCABULARY:,} boundaries, got "
                f"{len(bounds)}", "e.g. `bucketize: [18, 30, 50]`")
            return None
        if any(not math.isfinite(b) for b in bounds) or any(b >= c for b, c in itertools.pairwise(bounds)):
            bad(opt.bounds.span, "the bucket boundaries must be finite and strictly increasing, got "
                f"[{', '.join(f'{b:g}' for b in bounds)}]", None)
            return None
        return bounds

    def check_fitted_vocabularies(self) -> None:
        """``vocabulary:`` is fitted on the training rows of the node holding the column. In a horizontal
        pipeline that is every worker, each with its own rows: column j of the one-hot would be another
        value at each worker, under one shared model. Refused; hashing needs no fit. A median fill cannot be
        pooled (flows.horizontal's `stats` flow carries sums, not values): refused too."""
        if self.scenario != "horizontal":
            return
        for span in sorted(set(self.vocabularies), key=lambda s: (s.line, s.column)):
            self.error(span, "`vocabulary:` is not available in a horizontal pipeline: each worker would "
                       "choose its own most frequent values, so a one-hot column would mean a different "
                       "value at each worker under one shared model",
                       "use `hash: N buckets` (the same buckets at every worker, nothing to fit)")
        for span in sorted(set(self.medians), key=lambda s: (s.line, s.column)):
            self.error(span, "`median` is not available in a horizontal pipeline: the workers pool "
                       "counts, means and spreads of their training values at the aggregator (the `stats` "
                       "flow), from which the mean of all of them follows exactly, but not the median",
                       "use `mean` or `constant N`")

    def _rows_bound(self, block: ast.SchemaBlock, env: Env) -> int | None:
        if not block.rows:
            self.error(
                block.span,
                "the schema block needs `rows <= N`: the most rows the file may hold "
                "(it sizes the messages that carry ids or rows)",
                "add `rows <= N` (`fldsl data describe FILE` prints the block)",
            )
            return None
        if len(block.rows) > 1:
            self.error(block.rows[1].span, "`rows <=` is given twice in one schema block", "keep one bound")
            return None
        bound = evaluate(block.rows[0].value, "int", env, "the row bound", self.report)
        if bound is BAD:
            return None
        if bound <= 0:
            self.error(block.rows[0].value.span, f"the row bound must be positive, got {bound}")
            return None
        return int(bound)

    def _csv_fields(self, width: int, label_col: str | None) -> dict[str, TensorSpec]:
        fields: dict[str, TensorSpec] = {"features": TensorSpec(shape=[None, width], dtype="float32")}
        if label_col is not None:
            dtype = "float32" if self.loss_name == "mse" else "int64"
            fields["label"] = TensorSpec(shape=[None], dtype=dtype)  # type: ignore[arg-type]
        return fields

    # --- partition -------------------------------------------------------------------------------------
    def check_partition_kind(self) -> None:
        if not self.m.partitions:
            self.error(
                self.m.name.span,
                "the pipeline declares no partition",
                "add `partition vertical { align ... }`, `partition horizontal over ...` or "
                "`partition distributed from ...`",
            )
            raise _Fatal
        for extra in self.m.partitions[1:]:
            self.error(extra.span, "only one `partition` is allowed per pipeline")
        p = self.m.partitions[0]
        self.partition = p
        self.scenario = {
            ast.VerticalPartition: "vertical",
            ast.HorizontalPartition: "horizontal",
            ast.DistributedPartition: "distributed",
        }[type(p)]

    def party_ref(self, name: ast.Name, *, family_ok: bool = True) -> list[str] | None:
        """Party names a name stands for (a family expands to its members)."""
        if name.value in self.parties:
            return [name.value]
        if family_ok and name.value in self.families:
            return list(self.families[name.value])
        self.unknown(name.span, "party", name.value, [*self.parties, *self.families])
        return None

    def node_ref(self, ref: ast.Ref, what: str, *, family_ok: bool = False) -> list[str] | None:
        """Node ids a `party.node` (or `party` with one node) stands for."""
        if len(ref.parts) > 2:
            self.error(ref.span, f"{what} must be `party.node`, got `{ref.text}`")
            return None
        parties = self.party_ref(ref.parts[0], family_ok=False)
        if parties is None:
            return None
        party = self.parties[parties[0]]
        if len(ref.parts) == 1:
            if len(party.nodes) != 1:
                self.error(
                    ref.span, f"party `{party.name}` has several nodes; say which: `{party.name}.NODE`"
                )
                return None
            return [f"{party.name}.{party.nodes[0]}"]
        nname = ref.parts[1].value
        if nname in party.nodes:
            return [f"{party.name}.{nname}"]
        members = [n for n in party.nodes if party.node_families.get(n) == nname]
        if family_ok and members:
            return [f"{party.name}.{n}" for n in members]
        cands = list(party.nodes) + (sorted(set(party.node_families.values())) if family_ok else [])
        self.unknown_in(ref.parts[1].span, f"party `{party.name}`", "node", nname, cands)
        return None

    def check_partition_nodes(self) -> None:
        """Resolve the partition's parties and nodes (scenario rules on them are in flows.py)."""
        p = self.partition
        if isinstance(p, ast.HorizontalPartition):
            workers: list[str] = []
            for n in p.over:
                got = self.party_ref(n)
                if got:
                    workers += [w for w in got if w not in workers]
            server = self.node_ref(p.server, "the aggregator")
            if not workers or server is None:
                return
            self.worker_parties = workers
            self.server_node = server[0]
            if self.server_node.split(".")[0] in workers:
                self.error(
                    p.server.span, f"the aggregator `{self.server_node}` must not be one of the workers"
                )
            if p.reduce is not None and p.reduce.value not in ("mean", "fedavg"):
                self.unknown(p.reduce.span, "aggregation", p.reduce.value, ["mean", "fedavg"])
            if p.schedule.unit == "steps" and (p.schedule.count or 0) <= 0:
                self.error(p.schedule.span, "the step count must be positive")
        elif isinstance(p, ast.DistributedPartition):
            chief = self.node_ref(p.chief, "the chief")
            workers_ = self.node_ref(p.workers, "the workers", family_ok=True)
            if chief is None or workers_ is None:
                return
            self.chief_node = chief[0]
            self.dist_workers = workers_
            if p.server is not None:
                srv = self.node_ref(p.server, "the parameter server")
                if srv is None:
                    return
                self.server_node = srv[0]
            else:
                wparty = self.parties[workers_[0].split(".")[0]]
                rest = [f"{wparty.name}.{n}" for n in wparty.nodes if f"{wparty.name}.{n}" not in workers_]
                if len(rest) != 1:
                    self.error(
                        p.workers.span,
                        f"cannot tell which node of `{wparty.name}` is the parameter server",
                        f"name it: `... to {p.workers.text} via {wparty.name}.ps shard ...`",
                    )
                    return
                self.server_node = rest[0]
            if self.chief_node in workers_ or self.server_node in (*workers_, self.chief_node):
                self.error(p.span, "the chief, the workers and the parameter server must be different nodes")
            if p.strategy.value not in ("round_robin", "contiguous"):
                self.unknown(
                    p.strategy.span, "sharding strategy", p.strategy.value, ["round_robin", "contiguous"]
                )

    # --- model -----------------------------------------------------------------------------------------
    def dataset_field(self, ref: ast.Ref, at: str | None) -> Tensor | None:
        """``ds.field`` as a tensor (the dataset found by scenario rules)."""
        ds_name, field_name = ref.parts[0], ref.parts[1]
        owners = [p for p in self.parties.values() if ds_name.value in p.datasets]
        all_ds = sorted({d for p in self.parties.values() for d in p.datasets})
        if not owners:
            known_t = [t for t in self.tensors if "." not in t]
            self.unknown(ds_name.span, "data set", ds_name.value, all_ds)
            if ds_name.value in known_t:
                self.diags[-1] = Diagnostic(
                    "error",
                    f"`{ds_name.value}` is a tensor, not a data set; it has no field `{field_name.value}`",
                    self.file,
                    ds_name.span.line,
                    ds_name.span.column,
                    ds_name.span.single_line_end,
                )
            return None
        if self.scenario == "vertical":
            if len(owners) > 1:
                self.error(
                    ds_name.span,
                    f"data set `{ds_name.value}` is declared by several parties "
                    f"({', '.join(p.name for p in owners)}); give them different names",
                )
                return None
            owner: Party | None = owners[0]
        elif self.scenario == "horizontal":
            owner = None
            missing = [
                w
                for w in getattr(self, "worker_parties", [])
                if ds_name.value not in self.parties[w].datasets
            ]
            if missing:
                self.error(
                    ds_name.span,
                    f"data set `{ds_name.value}` is missing at worker party `{missing[0]}` "
                    "(horizontal parties share one schema)",
                )
                return None
            owners = [self.parties[w] for w in self.worker_parties]
        else:
            chief_party = self.chief_node.split(".")[0]
            if ds_name.value not in self.parties[chief_party].datasets:
                self.error(
                    ds_name.span,
                    f"data set `{ds_name.value}` is not held by the chief `{self.chief_node}` "
                    "(in distributed training only the chief has data)",
                )
                return None
            owner = self.parties[chief_party]
        ds = (owner or owners[0]).datasets[ds_name.value]
        if field_name.value not in ds.spec.fields:
            self.unknown_in(
                field_name.span, f"data set `{ds_name.value}`", "field", field_name.value, ds.spec.fields
            )
            return None
        party_tag = owner.name if owner else "*"
        src = f"{party_tag}.{ds_name.value}.{field_name.value}"
        t = Tensor(
            name=f"{ds_name.value}.{field_name.value}",
            spec=ds.spec.fields[field_name.value],
            party=owner.name if owner and self.scenario == "vertical" else None,
            sources={src: [src]},
            trainable=False,
            raw=True,
            span=ref.span,
        )
        return self.tensors.setdefault(t.name, t)

    def tensor_ref(self, ref: ast.Ref, at: str | None) -> Tensor | None:
        if len(ref.parts) == 1:
            t = self.tensors.get(ref.text)
            if t is None and ref.text in self.poisoned:
                return None
            if t is None:
                if ref.text in {d for p in self.parties.values() for d in p.datasets}:
                    self.error(
                        ref.span,
                        f"`{ref.text}` is a data set; use one of its fields, e.g. `{ref.text}.features`",
                    )
                    return None
                self.unknown(ref.span, "tensor", ref.text, [k for k in self.tensors if "." not in k])
                return None
            return t
        if len(ref.parts) == 2:
            return self.dataset_field(ref, at)
        self.error(ref.span, f"`{ref.text}` is not a tensor (use `name` or `dataset.field`)")
        return None

    def tensor_expr(self, expr: Any, at: str | None, target: str, counter: dict[str, int]) -> Tensor | None:
        if isinstance(expr, ast.Ref):
            return self.tensor_ref(expr, at)
        if isinstance(expr, ast.Call):
            return self.op_call(expr, at, target, counter, top=False)
        self.error(
            expr.span, f"expected a tensor (a name, `dataset.field` or an op call), got {describe(expr)}"
        )
        return None

    def op_call(
        self, call: ast.Call, at: str | None, target: str, counter: dict[str, int], top: bool
    ) -> Tensor | None:
        name = call.func.value
        op = sig.OPS.get(name)
        if op is None:
            if name in sig.LOSSES:
                self.error(
                    call.func.span, f"`{name}` is a loss; write it as `loss {name}(logits, dataset.label)`"
                )
            elif name == "grad":
                self.error(
                    call.func.span, "`grad(...)` is computed by the compiler; it can only appear in `allow`"
                )
            else:
                self.unknown(call.func.span, "op", name, sig.OPS)
            return None
        if name not in self.imported:
            self.error(call.func.span, f"op `{name}` is not imported", f"add `use {op.module}.{{{name}}}`")
        if top:
            out = target
        else:
            counter[name] = counter.get(name, 0) + 1
            out = f"{target}/{name}" + (f"_{counter[name]}" if counter[name] > 1 else "")
        inputs: list[Tensor] = []
        if op.variadic:
            args: dict[str, Any] | None = {}
            for a in call.args:
                if a.name is not None:
                    self.error(a.name.span, f"`{name}` takes tensors only, not `{a.name.value}:`")
                    args = None
                    continue
                t = self.tensor_expr(a.value, at, target, counter)
                if t is None:
                    args = None
                else:
                    inputs.append(t)
            if args is not None:
                args["inputs"] = [t.spec for t in inputs]
        else:
            collected: list[Tensor] = []

            def tensor(e: Any) -> Any:
                t = self.tensor_expr(e, at, target, counter)
                if t is None:
                    return BAD
                collected.append(t)
                return t

            env = Env({}, {})
            env.params, env.param_types = self.env.params, self.env.param_types
            args = self._bind(call, op.params, f"`{name}(...)`", env, tensor)
            if args is not None:
                inputs = [args[p.name] for p in op.params if p.is_tensor and args[p.name] is not None]
                args = {k: (v.spec if isinstance(v, Tensor) else v) for k, v in args.items()}
        if args is None:
            return None
        try:
            spec = op.shape(args)
            count = op.param_count(args)
        except sig.SignatureError as e:
            self.error(call.span, f"`{name}`: {e}")
            return None
        if out in self.tensors:
            self.error(call.span, f"tensor `{out}` is defined twice")
            return None
        params = {p.name: args[p.name] for p in op.params if not p.is_tensor}
        self.ops.append(
            OpCall(
                output=out,
                op=name,
                inputs=[t.name for t in inputs],
                params=params,
                spec=spec,
                party=at or "*",
            )
        )
        self.param_counts[out] = count
        self.op_spans[out] = call.span
        sources: dict[str, list[str]] = {}
        for t in inputs:
            for s, path in t.sources.items():
                sources.setdefault(s, [*path, out])
        t = Tensor(
            name=out,
            spec=spec,
            party=at,
            sources=sources,
            trainable=count > 0 or any(i.trainable and i.party == at for i in inputs),
            raw=False,
            span=call.span,
            op=name,
        )
        self.tensors[out] = t
        return t

    def check_model(self, env: Env) -> None:
        self.env = env
        if not self.m.models:
            self.error(self.m.name.span, "the pipeline has no `model { ... }` block")
            raise _Fatal
        for extra in self.m.models[1:]:
            self.error(extra.span, "only one `model` block is allowed")
        block = self.m.models[0]
        losses = [s for s in block.stmts if isinstance(s, ast.LossStmt)]
        for s in block.stmts:
            if isinstance(s, ast.Assign):
                defined = s.target.value in self.tensors
                self._assign(s)
                if not defined and s.target.value not in self.tensors:
                    self.poisoned.add(s.target.value)
        if not losses:
            self.error(
                block.span,
                "the model has no `loss`",
                "add e.g. `loss softmax_cross_entropy(logits, ds.label)`",
            )
            raise _Fatal
        for extra_loss in losses[1:]:
            self.error(extra_loss.span, "only one `loss` is allowed")
        self.loss_stmt = losses[0]
        self.check_loss(losses[0])

    def _assign(self, s: ast.Assign) -> None:
        at: str | None = None
        if self.scenario == "vertical":
            if s.at is None:
                self.error(
                    s.target.span,
                    "in a vertical pipeline every model statement says where it runs",
                    f"write `at PARTY: {s.target.value} = ...`",
                )
                return
            if s.at.value not in self.parties:
                self.unknown(s.at.span, "party", s.at.value, self.parties)
                return
            at = s.at.value
        elif s.at is not None:
            self.error(
                s.at.span,
                f"in a {self.scenario} pipeline every worker runs the whole model; "
                f"remove `at {s.at.value}:`",
            )
        if s.target.value in self.tensors:
            self.error(s.target.span, f"tensor `{s.target.value}` is defined twice")
            return
        if not isinstance(s.value, ast.Call):
            self.error(s.value.span, f"expected an op call, got {describe(s.value)}")
            return
        self.op_call(s.value, at, s.target.value, {}, top=True)

    def check_loss(self, stmt: ast.LossStmt) -> None:
        call = stmt.call
        name = call.func.value
        loss = sig.LOSSES.get(name)
        if loss is None:
            self.unknown(call.func.span, "loss", name, sig.LOSSES)
            raise _Fatal
        if len(call.args) != 2 or any(
            a.name is not None and a.name.value not in ("logits", "label") for a in call.args
        ):
            self.error(call.span, f"`{name}` takes two arguments: (logits, dataset.label)")
            raise _Fatal
        by_name = {a.name.value: a for a in call.args if a.name is not None}
        pos = [a for a in call.args if a.name is None]
        logits_arg = by_name.get("logits") or pos.pop(0)
        label_arg = by_name.get("label") or pos.pop(0)
        logits = self.tensor_expr(logits_arg.value, None, "loss", {})
        if not isinstance(label_arg.value, ast.Ref) or len(label_arg.value.parts) != 2:
            self.error(label_arg.span, "the label must be a data set field, e.g. `conversions.label`")
            raise _Fatal
        label = self.dataset_field(label_arg.value, None)
        if logits is None or label is None:
            raise _Fatal
        if not label.name.endswith(".label"):
            self.error(
                label_arg.span,
                f"`{label.name}` is not a label field (use `{label.name.split('.')[0]}.label`)",
            )
            raise _Fatal
        try:
            loss.check(logits.spec, label.spec)
        except sig.SignatureError as e:
            self.error(call.span, str(e))
            raise _Fatal from None
        self.check_label_classes(call.span, name, logits, label)
        self.logits_t, self.label_t = logits, label
        party = label.party or "*"
        self.loss = LossSpec(op=name, logits=logits.name, label=label.name, party=party)

    def check_label_classes(self, span: ast.Span, loss: str, logits: Tensor, label: Tensor) -> None:
        """A softmax whose logits width is not the label's class count, where the reader fixes that count
        (generated data); csv labels are checked row by row when the node reads them."""
        if loss != "softmax_cross_entropy":
            return
        ds = label.name.split(".")[0]
        readers = {p.datasets[ds].spec.reader for p in self.parties.values() if ds in p.datasets}
        for reader in sorted(readers):
            classes = sig.LABEL_CLASSES.get(reader)
            width = logits.spec.shape[-1]
            if classes is not None and width != classes:
                self.error(span, f"`{label.name}` of a `{reader}` data set has {classes} classes (0 and 1), "
                           f"but the softmax is over {width} logits (`{logits.name}` is "
                           f"{sig.fmt_spec(logits.spec)})",
                           f"make the last layer {classes} units wide, or use sigmoid_cross_entropy over "
                           "1 unit")
                raise _Fatal

    # --- train -----------------------------------------------------------------------------------------
    def check_train(self, env: Env) -> TrainSpec:
        if not self.m.trains:
            self.error(self.m.name.span, "the pipeline has no `train { ... }` block")
            raise _Fatal
        for extra in self.m.trains[1:]:
            self.error(extra.span, "only one `train` block is allowed")
        keys = ("epochs", "batch_size", "optimizer", "seed", "checkpoint", "metrics", "validation", "test",
                "pipeline")
        got: dict[str, ast.TrainItem] = {}
        for item in self.m.trains[0].items:
            k = item.key.value
            if k not in keys:
                self.unknown(item.key.span, "train setting", k, keys)
            elif k in got:
                self.error(item.key.span, f"`{k}` is set twice")
            else:
                got[k] = item
        self.train_items = got
        vals: dict[str, Any] = {}

        def num(k: str, ptype: str) -> Any:
            it = got.get(k)
            if it is None:
                return None
            if isinstance(it.value, ast.Schedule):
                self.error(it.value.span, f"`{k}` must be {_type_word(ptype)}")
                return None
            v = evaluate(it.value, ptype, env, f"`{k}`", self.report)
            return None if v is BAD else v

        for k in ("epochs", "batch_size"):
            if k not in got:
                self.error(self.m.trains[0].span, f"the train block needs `{k}`")
            v = num(k, "int")
            if v is not None and v <= 0:
                self.error(got[k].value.span, f"`{k}` must be positive, got {v}")
            vals[k] = v
        vals["seed"] = num("seed", "int") or 0
        opt = OptimizerSpec(name="adam", params={"learning_rate": 0.001})
        if "optimizer" in got:
            ov = got["optimizer"].value
            if not isinstance(ov, ast.Call):
                self.error(ov.span, "`optimizer` must be a call such as `adam(learning_rate: 0.001)`")
            elif ov.func.value not in sig.OPTIMIZERS:
                self.unknown(ov.func.span, "optimizer", ov.func.value, sig.OPTIMIZERS)
            else:
                args = self._bind(ov, sig.OPTIMIZERS[ov.func.value], f"`{ov.func.value}(...)`", env)
                if args is not None:
                    if args["learning_rate"] <= 0:
                        self.error(ov.span, "`learning_rate` must be positive")
                    opt = OptimizerSpec(name=ov.func.value, params=args)  # type: ignore[arg-type]
        ckpt: int | None = None
        if "checkpoint" in got:
            cv = got["checkpoint"].value
            if not isinstance(cv, ast.Schedule):
                self.error(cv.span, "`checkpoint` must be `every N steps` or `every epoch`")
            elif cv.unit != "epoch":
                if (cv.count or 0) <= 0:
                    self.error(cv.span, "the step count must be positive")
                ckpt = cv.count
        metrics = ["loss"]
        if "metrics" in got:
            mv = got["metrics"].value
            allowed = ("loss", "auc", "accuracy")
            if not isinstance(mv, ast.ListExpr):
                self.error(mv.span, "`metrics` must be a list such as `[loss, auc]`")
            else:
                metrics = []
                for x in mv.items:
                    v = evaluate(x, "name", env, "a metric", self.report, allowed)
                    loss = getattr(self, "loss", None)
                    if v in ("auc", "accuracy") and loss is not None and loss.op == "mse":
                        # A regression has no classes to rank or to get right; rather than report nothing.
                        self.error(x.span, f"`{v}` needs a classification loss, but the loss is mse",
                                   "keep `loss` (the holdout mean squared error) or use "
                                   "softmax_cross_entropy / sigmoid_cross_entropy")
                    elif v is not BAD and v not in metrics:
                        metrics.append(v)
        validation = ValidationSpec(seed=vals["seed"])
        if "validation" in got:
            v = num("validation", "float")
            if v is not None and not 0 < v < 1:
                self.error(
                    got["validation"].value.span, f"`validation` is a held-out fraction in (0, 1), got {v}"
                )
            elif v is not None:
                validation.fraction = v
        if "test" in got:
            tv = got["test"].value
            if not (isinstance(tv, ast.Ref) and len(tv.parts) == 1):
                self.error(tv.span, "`test` names a data set, e.g. `test: test`")
            elif self.scenario != "horizontal":
                self.error(tv.span, "`test:` is for horizontal pipelines; use `validation: FRACTION` here")
            elif not any(tv.text in p.datasets for p in self.parties.values()):
                self.unknown(
                    tv.span, "data set", tv.text, {d for p in self.parties.values() for d in p.datasets}
                )
            else:
                validation.test_data = tv.text
        pipeline = self.check_pipeline(got.get("pipeline"), num, ckpt)
        # A missing/bad value was reported; a placeholder lets the trust block still be checked.
        return TrainSpec(
            epochs=vals["epochs"] or 1,
            batch_size=vals["batch_size"] or 1,
            optimizer=opt,
            seed=vals["seed"],
            checkpoint_every_steps=ckpt,
            metrics=metrics,  # type: ignore[arg-type]
            validation=validation,
            pipeline=pipeline,
        )

    def check_pipeline(self, item: ast.TrainItem | None, num: Callable[[str, str], Any],
                       ckpt: int | None) -> Literal[0, 1]:
        """``pipeline: 0 | 1``: how far a vertical passive party may run ahead of its gradients (``num``
        evaluates a train setting as a number, reporting a bad one)."""
        if item is None:
            return 0
        if self.scenario != "vertical":
            # Horizontal/distributed workers have no activations to send ahead: the setting would be
            # silently meaningless there, like `test:` outside horizontal pipelines.
            self.error(item.key.span, "`pipeline:` is for vertical pipelines (passive parties sending "
                       "activations ahead)", "remove it")
            return 0
        v = num("pipeline", "int")
        if v is None:
            return 0
        if v not in (0, 1):
            self.error(item.value.span, f"`pipeline` is 0 (lock-step) or 1 (one step ahead), got {v}")
            return 0
        if v == 1 and ckpt == 1:
            self.warning(item.value.span, "`pipeline: 1` has no effect with `checkpoint: every 1 steps`: "
                         "the pipeline drains at every checkpoint", "checkpoint less often")
        return 1 if v == 1 else 0

    # --- trust -----------------------------------------------------------------------------------------
    def check_trust(self, env: Env) -> IRTrust:
        trust = IRTrust()
        if not self.m.trusts:
            self.error(
                self.m.name.span, "the pipeline has no `trust { ... }` block", "add at least the allow rules"
            )
            return trust
        for extra in self.m.trusts[1:]:
            self.error(extra.span, "only one `trust` block is allowed")
        seen: set[type] = set()
        for item in self.m.trusts[0].items:
            if not isinstance(item, ast.AllowStmt):
                if type(item) in seen:
                    self.error(item.span, "this setting is given twice in the trust block")
                    continue
                seen.add(type(item))
            match item:
                case ast.EnclaveStmt(call=call):
                    if call.func.value != "sgx":
                        self.unknown(call.func.span, "enclave kind", call.func.value, ["sgx"])
                        continue
                    args = self._bind(call, sig.ENCLAVE_PARAMS, "`sgx(...)`", env)
                    if args is not None and self._enclave_ok(call, args):
                        for k, v in args.items():
                            setattr(trust, k, v)
                        if args["debug"]:
                            self.warning(
                                _arg_span(call, "debug") or call.span,
                                "enclaves are built in debug mode (`debug: true`): the host can read "
                                "enclave memory, so this pipeline is not confidential",
                                "use `debug: false` for production",
                            )
                case ast.AttestationStmt(mode=mode):
                    if mode.value not in ("dcap", "sim"):
                        self.unknown(mode.span, "attestation mode", mode.value, ["dcap", "sim"])
                    else:
                        trust.attestation = mode.value  # type: ignore[assignment]
                case ast.AtRestStmt(mode=mode):
                    if mode.value not in ("encrypted", "plain"):
                        self.unknown(mode.span, "at_rest mode", mode.value, ["encrypted", "plain"])
                    else:
                        trust.at_rest = mode.value  # type: ignore[assignment]
                        if mode.value == "plain":
                            self.warning(
                                mode.span,
                                "checkpoints and exported models are written unencrypted (`at_rest plain`)",
                            )
                case ast.AllowStmt():
                    rules = self._rules(item)
                    if rules:
                        self.rules += rules
                        trust.rules.append(item.text)
        return trust

    def _enclave_ok(self, call: ast.Call, args: dict[str, Any]) -> bool:
        """Enclave settings Gramine accepts (checked here so the error points at the source)."""
        ok = True
        size = args["enclave_size"]
        m = re.fullmatch(r"([1-9][0-9]*)([KMG]?)", size)
        n = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)] if m else 0
        if n <= 0 or n & (n - 1):
            self.error(
                _arg_span(call, "enclave_size") or call.span,
                f'`enclave_size` must be a power of two such as "8G" or "512M", got "{size}"',
            )
            ok = False
        for key, lo, hi in (("max_threads", 1, 4096), ("isv_prod_id", 0, 65535), ("isv_svn", 0, 65535)):
            if not lo <= args[key] <= hi:
                span = _arg_span(call, key) or call.span
                self.error(span, f"`{key}` must be in {lo}..{hi}, got {args[key]}")
                ok = False
        return ok

    def _endpoint(self, ref: ast.Ref) -> tuple[str, str | None] | None:
        if len(ref.parts) > 2:
            self.error(ref.span, f"an allow rule names a party or `party.node`, got `{ref.text}`")
            return None
        pname = ref.parts[0].value
        if pname not in self.parties and pname not in self.families:
            self.unknown(ref.parts[0].span, "party", pname, [*self.parties, *self.families])
            return None
        if len(ref.parts) == 2:
            members = self.families.get(pname, [pname])
            nodes = {n for m in members for n in self.parties[m].nodes}
            nodes |= {f for m in members for f in self.parties[m].node_families.values()}
            if ref.parts[1].value not in nodes:
                self.unknown_in(ref.parts[1].span, f"party `{pname}`", "node", ref.parts[1].value, nodes)
                return None
            return pname, ref.parts[1].value
        return pname, None

    def _rules(self, a: ast.AllowStmt) -> list[Rule]:
        """One rule per (source, destination) pair of the statement."""
        srcs = [self._endpoint(r) for r in a.srcs]
        dsts = [self._endpoint(r) for r in a.dsts]
        tp = a.tensor
        known = [k for k in self.tensors]
        ok = True
        if tp.wrapper is not None:
            if tp.wrapper.value != "grad":
                self.error(
                    tp.wrapper.span, f"unknown tensor function `{tp.wrapper.value}` (only `grad(...)`)"
                )
                ok = False
            elif tp.ref.text not in self.tensors:
                self.unknown(tp.ref.span, "tensor", tp.ref.text, known)
                ok = False
        else:
            name = tp.ref.text
            specials = ("gradients", "weights", "shard", "stats")
            if name not in self.tensors and name not in specials:
                if len(tp.ref.parts) == 2 and any(
                    tp.ref.parts[0].value in p.datasets for p in self.parties.values()
                ):
                    pass  # a raw data set field; checked against the flows
                else:
                    self.unknown(tp.ref.span, "tensor", name, [*known, *specials])
                    ok = False
        if None in srcs or None in dsts or not ok:
            return []
        as_spec = self._type_spec(a.as_type) if a.as_type is not None else None
        return [
            Rule(a, s[0], s[1], d[0], d[1], tp.text, as_spec)
            for s in srcs
            for d in dsts
            if s is not None and d is not None
        ]

    def _type_spec(self, t: ast.TypeSpecExpr) -> TensorSpec | None:
        dtypes = ("float32", "float64", "int32", "int64", "bool")
        if t.dtype.value not in dtypes:
            self.unknown(t.dtype.span, "dtype", t.dtype.value, dtypes)
            return None
        shape: list[int | None] = []
        for d in t.dims:
            if isinstance(d, ast.Name):
                if d.value not in ("batch", "B"):
                    self.error(d.span, f"a dimension is a number or `batch`, got `{d.value}`")
                    return None
                shape.append(None)
            elif d.kind != "int" or int(d.value) <= 0:  # type: ignore[arg-type]
                self.error(d.span, "a dimension must be a positive whole number")
                return None
            else:
                shape.append(int(d.value))  # type: ignore[arg-type]
        return TensorSpec(shape=shape, dtype=t.dtype.value)  # type: ignore[arg-type]

    # --- helpers for flows.py --------------------------------------------------------------------------
    def party_of(self, node_id: str) -> Party:
        return self.parties[node_id.split(".", 1)[0]]

    def datasets_of(self, party: str) -> dict[str, IRDataset]:
        return self.parties[party].datasets


def _join(a: ast.Span, b: ast.Span) -> ast.Span:
    return ast.Span(a.line, a.column, b.end_line, b.end_column)


MAX_VOCABULARY = 100_000  # one-hot columns per category column: far beyond a useful vocabulary


def _quoted(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else json.dumps(name)


def _arg_span(call: ast.Call, name: str) -> ast.Span | None:
    return next((a.span for a in call.args if a.name is not None and a.name.value == name), None)


def _type_word(ptype: str) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "path": "a string (a path)"}.get(
        ptype, ptype
    )


def _no_params(params: dict[str, Any]) -> str | None:
    if params:
        return None
    return "this pipeline declares no parameters"


__all__ = ["Checker", "Rule", "Tensor"]


def _parquet_columns(path: Path) -> tuple[list[str], int] | str:
    """A Parquet file's column names and row count, from its footer alone (no column is read), or why it
    cannot be read."""
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return list(meta.schema.to_arrow_schema().names), int(meta.num_rows)
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        return "pyarrow is not installed"
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        return f"not a Parquet file ({e})"
