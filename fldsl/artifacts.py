"""The file formats fldsl writes: the only contract between the compiler and the runtime.

Data flows one way (ARCHITECTURE.md): the compiler writes these files into ``build/<pipeline>/``; the runtime
reads them and never imports the parser. Every file is a pydantic model serialised with :func:`dump_json`
(sorted keys, 2-space indent, trailing newline) so the same input gives byte-identical artifacts.

Layout of a build directory::

    build/<pipeline>/
      pipeline.json                    PipelineFile: IR summary, task graph, digest, measurements
      nodes/<party>.<node>/
        plan.json                      Plan: what this node runs            (measured: a trusted file)
        policy.json                    Policy: what it may send/receive     (measured: a trusted file)
        pins.json                      Pins: identities of every node       (NOT measured, see below)
        <node>.manifest.template       Gramine v1.9 manifest template (jinja)
        <node>.manifest.toml           the same rendered for this machine; lists plan/policy with their sha256
      after `fldsl compile --sign KEY` (compiler/sign.py), also:
        <node>.manifest                what gramine-manifest made of the rendering (every file hashed)
        <node>.manifest.sgx, <node>.sig    gramine-sgx-sign's output: what gramine-sgx runs, the SIGSTRUCT

Why pins are not measured: if node A's measured files pinned B's measurement and B's pinned A's, each
measurement would depend on the other (a hash cycle). Instead every node of a deployment carries the same
pin table (Pins); its SHA-256 is put into the node's RA-TLS claims (bound into the quote's report_data), and
a peer is accepted only if its attested pin-table digest equals our own. A host that edits its node's pins
changes that digest, so honest peers refuse the node. See README "Trust model".

Addresses are not in any of these files: they differ per deployment and are not a security property (the
peer's identity is checked by attestation). The launcher passes them at run time (``--peer id=host:port``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

PLAN_FORMAT: Final = "fldsl.plan/1"
POLICY_FORMAT: Final = "fldsl.policy/1"
PINS_FORMAT: Final = "fldsl.pins/1"
PIPELINE_FORMAT: Final = "fldsl.pipeline/1"

DType = Literal["float32", "float64", "int32", "int64", "bool", "string", "bytes"]
JSON = Any


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------


class TensorSpec(_Model):
    """A tensor's static type. ``None`` in a shape is the batch dimension (known only at run time)."""

    shape: list[int | None]
    dtype: DType

    def text(self, *, compact: bool = False) -> str:
        """The pipeline language's spelling, ``float32[batch, 64]`` (``float32[B,64]`` compact, for graph
        labels): the one formatter of the compiler's, the graph's and the transport guard's messages."""
        if compact:
            return f"{self.dtype}[{','.join('B' if d is None else str(d) for d in self.shape)}]"
        return f"{self.dtype}[{', '.join('batch' if d is None else str(d) for d in self.shape)}]"

    def nbytes(self, batch: int) -> int:
        n = 1
        for d in self.shape:
            n *= batch if d is None else d
        return n * _DTYPE_SIZE.get(self.dtype, 8)


_DTYPE_SIZE = {"float32": 4, "float64": 8, "int32": 4, "int64": 8, "bool": 1}


class Flow(_Model):
    """A tensor that crosses between two nodes, as allowed by one ``allow`` rule of the trust block."""

    id: str  # stable id, e.g. "media.trainer->shop.trainer:act1"
    tensor: str  # logical tensor name: "act1", "grad(act1)", "gradients", "weights", "shard", "psi"
    kind: Literal[
        "activation", "gradient", "gradients", "weights", "data", "psi", "metrics", "stats", "control",
    ]
    src: str  # node id "party.node"
    dst: str  # node id
    spec: TensorSpec | None = None  # None for structured payloads (weights lists, PSI sets)
    max_bytes: int  # per message, enforced by the receiver; compile-time bound from shapes and batch size
    rule: str  # the trust-block rule that allows it, as written, e.g. "allow media -> shop: act1"
    rule_span: str | None = None  # "file:line:col" of that rule


ColumnType = Literal["numeric", "integer", "category"]
# A pooled column's row in a horizontal `stats` message (float64): the count of its present training
# values, their mean and sum of squared deviations (M2), min and max (0 when the count is 0), and the
# count of its missing training cells. Enough to merge exactly (Chan et al.'s pairwise update), and no row.
POOLED_STATS = ("present", "mean", "m2", "min", "max", "missing")
COLUMN_TYPES: tuple[ColumnType, ...] = ("numeric", "integer", "category")


class MissingSpec(_Model):
    """``missing: "?" mean indicator``: which cells are missing and what replaces them (fitted on the
    training rows by the node that owns the column: fldsl.runtime.preprocess)."""

    token: str | None = None  # a cell equal to it (spaces stripped) is missing; an empty cell always is
    fill: Literal["mean", "median", "constant"] | None = None  # numeric/integer; None for category
    value: float | None = None  # fill "constant"
    indicator: bool = False  # numeric/integer: one more feature column, 1.0 where the cell was missing


class ScaleSpec(_Model):
    """``scale: standard | minmax | clip(lo, hi)`` (numeric/integer)."""

    kind: Literal["standard", "minmax", "clip"]
    lo: float | None = None  # clip bounds
    hi: float | None = None


class ColumnSpec(_Model):
    """A column declared by a csv data set's schema block: ``numeric age`` / ``integer children`` /
    ``category education vocabulary: top 100``, with its preprocessing (docs/language.md, "Schema blocks")."""

    name: str
    type: ColumnType  # numeric: finite numbers; integer: whole numbers (both read as float32 features)
    missing: MissingSpec | None = None
    scale: ScaleSpec | None = None
    vocabulary: int | None = None  # category: the k most frequent training values, plus one other column
    hash_buckets: int | None = None  # category: one-hot of a hash of the value into N buckets
    buckets: list[float] | None = None  # numeric/integer: one-hot of the bucket between these boundaries

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Plain columns serialise as before preprocessing existed: plans (and measurements) keep their bytes.
        data: dict[str, Any] = handler(self)
        for k in ("missing", "scale", "vocabulary", "hash_buckets", "buckets"):
            if data.get(k) is None:
                data.pop(k, None)
        return data

    @property
    def width(self) -> int:
        """The feature columns this column becomes: 1, or k + 1 with ``bucketize:`` k boundaries (+1 with a
        missing indicator); a category k + 1 with ``vocabulary: top k``, N with ``hash: N buckets``."""
        if self.type == "category":
            return (self.vocabulary + 1) if self.vocabulary is not None else int(self.hash_buckets or 0)
        value = len(self.buckets) + 1 if self.buckets is not None else 1
        return value + int(self.missing is not None and self.missing.indicator)

    @property
    def pooled(self) -> bool:
        """Whether horizontal workers pool this column's statistics at the aggregator (a numeric column
        filled with its mean or scaled `standard` / `minmax`): one row of :data:`POOLED_STATS` fields each
        in the `stats` flow, so every worker fits the same transform, the one central training would fit."""
        if self.type == "category":
            return False
        return (self.missing is not None and self.missing.fill == "mean") or \
            (self.scale is not None and self.scale.kind in ("standard", "minmax"))

    @property
    def fitted(self) -> bool:
        """Whether reading this column needs statistics of the training rows or a transform (anything but a
        plain numeric/integer column)."""
        return self.type == "category" or self.missing is not None or self.scale is not None \
            or self.buckets is not None


# The readers of a party's own files (the others generate their rows): what a node binds with --data, checks
# against a declared schema, mounts into its enclave and scores new rows from.
FILE_READERS = ("csv", "parquet")


class DataSpec(_Model):
    """A data set this node reads. Columns are resolved at compile time (patterns like ``x*`` expanded)."""

    name: str  # dataset name in the pipeline, e.g. "impressions"
    reader: Literal["csv", "parquet", "criteo", "wide_n_deep"]
    # csv / parquet: without a schema block, the absolute path the compiler found; with one, the path as
    # declared (after ``${param}`` substitution, relative to the node's working folder), identical on every
    # machine. Either may be rebound on the node's machine at run time.
    path: str | None = None
    params: dict[str, JSON] = Field(default_factory=dict)  # generators: rows, seed, part, parts, ...
    id_column: str | None = None
    label_column: str | None = None
    feature_columns: list[str] = Field(default_factory=list)  # csv: numeric features, in order
    # The fields a model can reference as ``<dataset>.<field>``, e.g. features / label / dense / sparse.
    fields: dict[str, TensorSpec] = Field(default_factory=dict)
    # csv with a schema block: every declared column in declaration order, and `rows <= N`. The compiler
    # never opens such a file; the node checks the file against both before it uses any row.
    columns: list[ColumnSpec] | None = None
    max_rows: int | None = None

    def pooled_columns(self) -> list[ColumnSpec]:
        """The declared feature columns whose statistics horizontal workers pool (``ColumnSpec.pooled``), in
        feature order: the rows of a ``stats`` message (the compiler sizes the flow by them, the workers fill
        and the aggregator merges them)."""
        by_name = {c.name: c for c in self.columns or []}
        return [by_name[n] for n in self.feature_columns if n in by_name and by_name[n].pooled]

    @model_serializer(mode="wrap")
    def _omit_no_schema(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written only for declared schemas, so plans (and measurements) of csv data sets whose header is
        # read at compile time, and of generators, keep the bytes they had before schema blocks existed.
        data: dict[str, Any] = handler(self)
        if self.columns is None:
            data.pop("columns", None)
        if self.max_rows is None:
            data.pop("max_rows", None)
        return data


class OpCall(_Model):
    """One stdlib op application in the model block: ``output = op(inputs..., params...)``."""

    output: str  # tensor name, e.g. "act1"
    op: str  # stdlib op name, e.g. "mlp", "dense", "concat", "embed", "wide_deep", "dlrm"
    inputs: list[str]  # tensor refs: "<dataset>.<field>" or another op's output
    params: dict[str, JSON] = Field(default_factory=dict)  # with defaults filled in
    spec: TensorSpec
    party: str  # where it runs (placement); for horizontal/distributed every worker runs every op


class LossSpec(_Model):
    op: str  # "softmax_cross_entropy" | "sigmoid_cross_entropy" | "mse"
    logits: str  # tensor ref
    label: str  # tensor ref "<dataset>.label"
    party: str


class OptimizerSpec(_Model):
    name: Literal["sgd", "adam", "adagrad"]
    params: dict[str, JSON] = Field(default_factory=dict)  # learning_rate, momentum, ...


class ValidationSpec(_Model):
    """Held-out evaluation, computed by the label owner (vertical) or on every worker / a test set."""

    fraction: float = 0.0  # 0 = none; ids are split with a stratified, seeded split
    seed: int = 0
    test_data: str | None = None  # dataset name holding a separate test split (horizontal)


MetricName = Literal["loss", "auc", "accuracy"]


class TrainSpec(_Model):
    epochs: int
    batch_size: int
    optimizer: OptimizerSpec
    seed: int = 0
    checkpoint_every_steps: int | None = None  # None = only at epoch end
    metrics: list[MetricName] = Field(default_factory=lambda: list[MetricName](["loss"]))
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    steps_per_epoch: int | None = None  # computed by the runtime when None
    # Vertical only: how many steps a passive party may run ahead of the gradients it has applied. 0 = exact
    # lock-step (the same math as central training); 1 = it sends step i+1's activations before applying
    # step i's gradient (one step of staleness, see docs/language.md "Training").
    pipeline: Literal[0, 1] = 0

    @model_serializer(mode="wrap")
    def _omit_default_pipeline(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written only when set, so plans (and their measurements) of pipelines that do not use it keep
        # the bytes they had before the setting existed.
        data: dict[str, Any] = handler(self)
        if self.pipeline == 0:
            data.pop("pipeline", None)
        return data


class AlignmentSpec(_Model):
    method: Literal["psi_ecdh", "join"]
    key: str  # id column name
    parties: list[str]  # node ids taking part; the first is the leader (label owner)


class AggregationSpec(_Model):
    """Horizontal / distributed training: who aggregates, how and how often."""

    server: str  # node id of the parameter server
    workers: list[str]  # node ids
    mode: Literal["sync", "fedavg"]  # sync = gradients every step; fedavg = weights every N steps / epoch
    every_steps: int | None = None  # fedavg: every N local steps
    every_epoch: bool = False  # fedavg: once per epoch
    weighting: Literal["mean", "examples"] = "examples"


class ShardingSpec(_Model):
    """Distributed training: the chief shards its data to the workers."""

    chief: str
    workers: list[str]
    strategy: Literal["round_robin", "contiguous"]


class Task(_Model):
    """A task of the task graph placed on this node (see PipelineFile.graph for the whole graph).

    Vertical nodes execute their step tasks in list order (fldsl.runtime.roles.split_schedule): ``send`` /
    ``recv`` params name the ``flow``; a ``backward`` task's ``wrt`` maps each gradient tensor the node
    sends or receives to the cut tensor it is the gradient of (``{"grad(act1)": "act1"}``)."""

    id: str  # e.g. "media.trainer/forward:act1"
    kind: Literal[
        "read", "align", "shard", "forward", "send", "recv", "loss", "backward", "apply",
        "aggregate", "checkpoint", "export", "evaluate", "fit",
    ]
    inputs: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    params: dict[str, JSON] = Field(default_factory=dict)


class PeerRef(_Model):
    id: str  # node id
    party: str
    dial: bool  # True: this node opens the connection (client); False: the peer dials us


# ---------------------------------------------------------------------------------------------------------
# plan.json
# ---------------------------------------------------------------------------------------------------------

Role = Literal[
    "vertical.active",  # label owner: top model + loss, returns gradients of received activations
    "vertical.passive",  # feature holder: bottom model, sends activations, applies returned gradients
    "horizontal.worker",
    "horizontal.server",  # parameter server / aggregator
    "distributed.chief",  # data owner: shards and streams data to the workers
    "distributed.worker",
    "distributed.server",
]


class Plan(_Model):
    format: Literal["fldsl.plan/1"] = PLAN_FORMAT
    pipeline: str
    node: str  # "party.node"
    party: str
    role: Role
    peers: list[PeerRef]
    data: list[DataSpec]  # data sets this node reads (empty for a PS)
    alignment: AlignmentSpec | None = None
    model: list[OpCall]  # ops this node computes, in topological order
    loss: LossSpec | None = None  # only on the label owner / workers
    train: TrainSpec
    aggregation: AggregationSpec | None = None
    sharding: ShardingSpec | None = None
    sends: list[str] = Field(default_factory=list)  # Flow ids this node sends
    receives: list[str] = Field(default_factory=list)  # Flow ids this node receives
    tasks: list[Task]
    export: str | None = None  # logical name of the exported (sealed) model, e.g. "media.trainer/model"
    # The model owner's public key (PEM; `fldsl compile --owner-key PARTY=PUB.pem`): the export is also
    # written encrypted to it (fldsl.runtime.owner_export), since a sealed export opens only inside the
    # enclave. Kept in the plan so it is measured: a host cannot swap in a key of its own.
    export_recipient: str | None = Field(default=None, max_length=16384)

    @model_serializer(mode="wrap")
    def _omit_unset_recipient(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written only when set, so plans (and measurements) without an owner key keep their bytes.
        data: dict[str, Any] = handler(self)
        if self.export_recipient is None:
            data.pop("export_recipient", None)
        return data


# ---------------------------------------------------------------------------------------------------------
# policy.json
# ---------------------------------------------------------------------------------------------------------


class AttestationRequirement(_Model):
    """What a peer's evidence must satisfy (identity values themselves are in Pins)."""

    mode: Literal["dcap", "sim"]  # dcap: real SGX quotes required; sim: simulated quotes accepted
    allow_debug: bool = False
    allow_unverified_real_quotes: bool = False  # dev only: real quotes when Intel QVL is absent


class Policy(_Model):
    format: Literal["fldsl.policy/1"] = POLICY_FORMAT
    pipeline: str
    node: str
    attestation: AttestationRequirement
    accept_peers: list[str]  # node ids allowed to connect / be connected to
    flows: list[Flow]  # every flow this node sends or receives (src or dst is this node)
    max_message_bytes: int  # gRPC message limit (chunks above it)
    at_rest: Literal["encrypted", "plain"] = "encrypted"


# ---------------------------------------------------------------------------------------------------------
# pins.json — identical for every node of a deployment
# ---------------------------------------------------------------------------------------------------------


class Identity(_Model):
    """The identity a node's quote must show."""

    mr_enclave: list[str]  # hex; any one matches. Simulated unless measurement_kind == "sgx"
    # A signed build ("sgx") run under gramine-direct reports a simulated quote: its mr_enclave is
    # fldsl.measurement.sim_mr_enclave_gramine over the signed manifest, pinned here (None: unsigned build).
    sim_mr_enclave: str | None = None
    mr_signer: str | None = None  # hex; None = not checked (mr_enclave is the stronger pin)
    isv_prod_id: int
    isv_svn_min: int
    debug: bool = False  # the node's enclave is built with sgx.debug = true
    measurement_kind: Literal["simulated", "sgx"] = "simulated"

    @model_serializer(mode="wrap")
    def _omit_unsigned_sim(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written only for signed builds, so unsigned pin tables keep their bytes (and digests).
        data: dict[str, Any] = handler(self)
        if self.sim_mr_enclave is None:
            data.pop("sim_mr_enclave", None)
        return data


class Pins(_Model):
    format: Literal["fldsl.pins/1"] = PINS_FORMAT
    pipeline: str
    nodes: dict[str, Identity]  # node id -> identity

    def digest(self) -> str:
        """The value bound into every node's RA-TLS claims (see module docstring)."""
        return sha256_hex(dump_json(self).encode())

    def parties(self) -> list[str]:
        """The parties whose nodes are pinned (node ids are ``party.node``)."""
        return sorted({nid.split(".", 1)[0] for nid in self.nodes})


# ---------------------------------------------------------------------------------------------------------
# pipeline.json
# ---------------------------------------------------------------------------------------------------------


class GraphNode(_Model):
    id: str
    kind: str  # Task.kind
    node: str  # node id it is placed on
    party: str
    label: str
    params: dict[str, JSON] = Field(default_factory=dict)


class GraphEdge(_Model):
    src: str
    dst: str
    flow: str | None = None  # Flow.id when the edge crosses nodes
    tensor: str | None = None
    spec: TensorSpec | None = None


class NodeSummary(_Model):
    id: str
    party: str
    role: Role
    measurement: str  # hex mr_enclave (simulated unless signed)
    measurement_kind: Literal["simulated", "sgx"] = "simulated"
    files: dict[str, str]  # relative path -> sha256 of every artifact written for this node


class PipelineFile(_Model):
    format: Literal["fldsl.pipeline/1"] = PIPELINE_FORMAT
    pipeline: str
    digest: str  # over source, stdlib modules used and every rendered artifact
    source: str  # file name of the .flp (not the absolute path: keeps output machine-independent)
    params: dict[str, JSON]  # pipeline parameters after CLI overrides
    scenario: Literal["vertical", "horizontal", "distributed"]
    parties: dict[str, list[str]]  # party -> node ids
    nodes: list[NodeSummary]
    flows: list[Flow]
    graph_nodes: list[GraphNode]
    graph_edges: list[GraphEdge]
    ir: dict[str, JSON]  # the checked IR, for tools


# ---------------------------------------------------------------------------------------------------------
# Serialisation helpers: the one way every artifact is written and read.
# ---------------------------------------------------------------------------------------------------------


def dump_json(model: BaseModel | dict[str, Any]) -> str:
    """Canonical JSON: sorted keys, 2-space indent, trailing newline, no NaN."""
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactError(Exception):
    """A build directory file is missing, malformed or of another format version."""


M = TypeVar("M", bound=BaseModel)


def load_model(cls: type[M], path: Path) -> M:
    try:
        return cls.model_validate_json(path.read_bytes())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: missing (was the pipeline compiled? run `fldsl compile`)") from e
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise ArtifactError(f"{path}: not a valid {cls.__name__} file: {e}") from e


def node_dir(build_dir: Path, node_id: str) -> Path:
    return build_dir / "nodes" / node_id
