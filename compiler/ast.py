"""The typed syntax tree of a ``.flp`` file: plain dataclasses, every node with its source span.

The parser (``fldsl.compiler.parse``) builds it; nothing here is checked yet (names, types, shapes are the
job of ``fldsl.compiler.check``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Span:
    line: int
    column: int
    end_line: int
    end_column: int

    @property
    def single_line_end(self) -> int | None:
        return self.end_column if self.end_line == self.line else None


@dataclass
class Name:
    value: str
    span: Span


@dataclass
class Literal_:
    kind: Literal["int", "float", "str", "bool", "none"]
    value: int | float | str | bool | None
    span: Span


@dataclass
class Ref:
    """A dotted name: ``act1``, ``impressions.features``, ``hub.ps``, ``psi.ecdh``."""

    parts: list[Name]
    span: Span

    @property
    def text(self) -> str:
        return ".".join(p.value for p in self.parts)


@dataclass
class ListExpr:
    items: list[Expr]
    span: Span


@dataclass
class Arg:
    name: Name | None  # None for positional
    value: Expr
    span: Span


@dataclass
class Call:
    func: Name
    args: list[Arg]
    span: Span


@dataclass
class Schedule:
    """``every step`` / ``every N steps`` / ``every epoch``."""

    unit: Literal["step", "steps", "epoch"]
    count: int | None
    span: Span


@dataclass
class BinOp:
    """Integer / float arithmetic on parameters: ``i - 1``, ``rows * 2``."""

    op: str  # "+", "-", "*"
    left: Expr
    right: Expr
    span: Span


Expr = Call | Ref | Literal_ | ListExpr | BinOp


@dataclass
class Range:
    lo: int
    hi: int
    span: Span


@dataclass
class ParamDecl:
    name: Name
    type: Name
    default: Literal_
    span: Span


@dataclass
class UseDecl:
    module: list[Name]
    names: list[Name] | None  # None: `use std.models.mlp` style (last part of module is the name)
    span: Span


@dataclass
class NodeDecl:
    name: Name
    range: Range | None
    span: Span


@dataclass
class RowsBound:
    """``rows <= 50000`` in a schema block."""

    value: Expr
    span: Span


@dataclass
class MissingOpt:
    """``missing: "?" mean indicator`` (each part optional; the checker says which combinations mean
    something for the line's type). ``fill`` is ``mean``, ``median`` or ``constant`` (then ``value``)."""

    token: Literal_ | None
    fill: Name | None
    value: Expr | None
    indicator: Name | None
    span: Span


@dataclass
class ScaleOpt:
    """``scale: standard`` / ``scale: minmax`` / ``scale: clip(lo, hi)``."""

    kind: Name
    lo: Expr | None
    hi: Expr | None
    span: Span


@dataclass
class VocabularyOpt:
    """``vocabulary: top K``."""

    top: Expr
    span: Span


@dataclass
class HashOpt:
    """``hash: N buckets``."""

    buckets: Expr
    span: Span


@dataclass
class BucketizeOpt:
    """``bucketize: [b1, b2, ...]`` (numeric / integer: one-hot of the bucket between boundaries)."""

    bounds: Expr
    span: Span


ColumnOption = MissingOpt | ScaleOpt | VocabularyOpt | HashOpt | BucketizeOpt


@dataclass
class ColumnDecl:
    """``numeric age, "hours-per-week" missing: mean``: a type (checked later, so a typo gets a
    suggestion), its columns (a quoted name's span covers its quotes) and the options that apply to each."""

    type: Name
    columns: list[Name]
    span: Span
    options: list[ColumnOption] = field(default_factory=list)


@dataclass
class SchemaBlock:
    """``{ rows <= N  numeric a, b  integer c }`` after ``csv(...)``: a csv file described, not opened."""

    rows: list[RowsBound]
    columns: list[ColumnDecl]
    span: Span


@dataclass
class DataDecl:
    name: Name
    reader: Call
    span: Span
    schema: SchemaBlock | None = None


@dataclass
class PartyDecl:
    name: Name
    range: Range | None
    description: str | None
    nodes: list[NodeDecl]
    data: list[DataDecl]
    span: Span


@dataclass
class AlignStmt:
    datasets: list[Ref]
    key: Name
    method: Ref
    span: Span


@dataclass
class VerticalPartition:
    aligns: list[AlignStmt]
    span: Span


@dataclass
class HorizontalPartition:
    over: list[Name]
    server: Ref
    schedule: Schedule
    reduce: Name | None
    span: Span


@dataclass
class DistributedPartition:
    chief: Ref
    workers: Ref
    server: Ref | None
    strategy: Name
    span: Span


Partition = VerticalPartition | HorizontalPartition | DistributedPartition


@dataclass
class Assign:
    at: Name | None
    target: Name
    value: Expr
    span: Span


@dataclass
class LossStmt:
    call: Call
    span: Span


@dataclass
class ModelBlock:
    stmts: list[Assign | LossStmt]
    span: Span


@dataclass
class TrainItem:
    key: Name
    value: Expr | Schedule
    span: Span


@dataclass
class TrainBlock:
    items: list[TrainItem]
    span: Span


@dataclass
class TensorPat:
    """``act1``, ``impressions.sparse``, ``gradients`` or ``grad(act1)``."""

    wrapper: Name | None
    ref: Ref
    span: Span

    @property
    def text(self) -> str:
        return f"{self.wrapper.value}({self.ref.text})" if self.wrapper else self.ref.text


@dataclass
class TypeSpecExpr:
    dtype: Name
    dims: list[Name | Literal_]
    span: Span


@dataclass
class EnclaveStmt:
    call: Call
    span: Span


@dataclass
class AttestationStmt:
    mode: Name
    span: Span


@dataclass
class AllowStmt:
    srcs: list[Ref]  # `allow guest, host -> arbiter: weights` allows each pair
    dsts: list[Ref]
    tensor: TensorPat
    as_type: TypeSpecExpr | None
    span: Span
    text: str = ""  # the rule as written (normalised whitespace)


@dataclass
class AtRestStmt:
    mode: Name
    span: Span


TrustItem = EnclaveStmt | AttestationStmt | AllowStmt | AtRestStmt


@dataclass
class TrustBlock:
    items: list[TrustItem]
    span: Span


@dataclass
class Module:
    """A whole ``.flp`` file."""

    name: Name
    params: list[ParamDecl] = field(default_factory=list)
    uses: list[UseDecl] = field(default_factory=list)
    parties: list[PartyDecl] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    models: list[ModelBlock] = field(default_factory=list)
    trains: list[TrainBlock] = field(default_factory=list)
    trusts: list[TrustBlock] = field(default_factory=list)
