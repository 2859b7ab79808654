"""The checker's shared state: diagnostics and what each pass resolved (declared here, set by the passes).

The passes (resolve, schema, scenario, shapes, train, trust, then flows) are functions that take this
state; ``fldsl.compiler.check.Checker`` runs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fldsl.artifacts import (
    ColumnSpec,
    LossSpec,
    OpCall,
    TensorSpec,
)
from fldsl.compiler import ast
from fldsl.compiler.ir import IRDataset
from fldsl.compiler.values import BAD, Env, evaluate
from fldsl.diagnostics import Diagnostic, suggest, suggest_in
from fldsl.stdlib import signatures as sig


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


@dataclass
class Roles:
    """The scenario pass's result: the nodes the partition names (empty where its scenario has none)."""

    worker_parties: list[str] = field(default_factory=list)  # horizontal: the worker parties
    server_node: str = ""  # horizontal: the aggregator; distributed: the parameter server
    chief_node: str = ""  # distributed
    dist_workers: list[str] = field(default_factory=list)  # distributed: the worker nodes


class CheckState:
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
        # What the later passes set, declared here so every reader (flows.py included) sees one typed state.
        # Those without a value are set before any reader runs: a pass reached only when the earlier one
        # raised no error (run() calls fail_if_errors between them).
        self.loss_name: str | None = None  # Checker.run, before the data pass (it decides csv label dtypes)
        self.partition: ast.Partition  # scenario pass (check_partition_kind)
        self.roles = Roles()  # scenario pass (check_partition_nodes returns them)
        self.env: Env  # shapes pass: the parameters the op calls read
        self.loss_stmt: ast.LossStmt  # shapes pass
        self.logits_t: Tensor  # shapes pass
        self.label_t: Tensor  # shapes pass
        self.loss: LossSpec  # shapes pass
        self.train_items: dict[str, ast.TrainItem] = {}  # train pass

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

    # --- argument binding, shared by every pass that reads a call ---------------------------------------
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

    # --- helpers for flows.py --------------------------------------------------------------------------
    def party_of(self, node_id: str) -> Party:
        return self.parties[node_id.split(".", 1)[0]]

    def datasets_of(self, party: str) -> dict[str, IRDataset]:
        return self.parties[party].datasets


def _arg_span(call: ast.Call, name: str) -> ast.Span | None:
    return next((a.span for a in call.args if a.name is not None and a.name.value == name), None)


def _type_word(ptype: str) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "path": "a string (a path)"}.get(
        ptype, ptype
    )
