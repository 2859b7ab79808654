"""The checked IR: a pipeline whose names resolve, whose shapes are known and whose flows are allowed.

Built by ``fldsl.compiler.check`` from the AST; lowered to the task graph and plans by
``fldsl.compiler.lower``. It reuses the artifact models (``fldsl.artifacts``) for everything that ends up
in a plan, so what was checked is exactly what is written.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from fldsl.artifacts import (
    AggregationSpec,
    AlignmentSpec,
    DataSpec,
    Flow,
    LossSpec,
    OpCall,
    Role,
    ShardingSpec,
    TensorSpec,
    TrainSpec,
)

Scenario = Literal["vertical", "horizontal", "distributed"]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IRParty(_M):
    name: str  # "bank2"
    description: str | None = None
    family: str | None = None  # "bank" for parties declared as `party bank[1..4]`
    index: int | None = None
    nodes: list[str]  # node ids "bank2.worker"


class IRDataset(_M):
    party: str
    spec: DataSpec
    rows: int | None = None  # known row count (generators: `rows`; csv: data lines), for message bounds
    span: str  # "file:line:col" of the declaration


class IRTrust(_M):
    enclave_size: str = "8G"
    max_threads: int = 64
    isv_prod_id: int = 0
    isv_svn: int = 0
    debug: bool = False
    edmm: bool = False
    attestation: Literal["dcap", "sim"] = "sim"
    at_rest: Literal["encrypted", "plain"] = "encrypted"
    rules: list[str] = Field(default_factory=list)  # allow rules as written


class IRNode(_M):
    id: str  # "party.node"
    party: str
    role: Role
    data: list[str] = Field(default_factory=list)  # data set names this node reads
    ops: list[str] = Field(default_factory=list)  # op outputs this node computes (topological order)
    input_specs: dict[str, TensorSpec] = Field(default_factory=dict)  # refs its ops read from outside
    has_loss: bool = False


class Program(_M):
    """A checked pipeline (what ``fldsl check`` returns)."""

    pipeline: str
    source_name: str  # file name of the .flp, no directories
    source_sha256: str
    params: dict[str, Any]
    uses: list[str]  # stdlib modules imported, e.g. ["std.models"]
    scenario: Scenario
    parties: list[IRParty]
    nodes: list[IRNode]
    datasets: list[IRDataset]
    ops: list[OpCall]  # every op application in topological order (vertical: with its party)
    param_counts: dict[str, int]  # op output -> trainable parameter count
    loss: LossSpec
    train: TrainSpec
    alignment: AlignmentSpec | None = None
    aggregation: AggregationSpec | None = None
    sharding: ShardingSpec | None = None
    trust: IRTrust
    flows: list[Flow]
    _warnings: list[Any] = PrivateAttr(default_factory=list)  # fldsl.diagnostics.Diagnostic
    # party -> the model owner's public key PEM (`fldsl compile --owner-key`); lowered into the plans of the
    # party's exporting nodes. Private: it is a compile option, not part of the checked IR in pipeline.json.
    _owner_keys: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def warnings(self) -> list[Any]:
        return list(self._warnings)

    @property
    def owner_keys(self) -> dict[str, str]:
        return dict(self._owner_keys)

    def set_owner_keys(self, keys: dict[str, str]) -> None:
        self._owner_keys = dict(keys)

    def node(self, node_id: str) -> IRNode:
        return next(n for n in self.nodes if n.id == node_id)

    def party_nodes(self) -> dict[str, list[str]]:
        return {p.name: p.nodes for p in self.parties}
