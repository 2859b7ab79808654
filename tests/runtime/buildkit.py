"""Hand-built build directories (plan / policy / pins / rendered manifest) for runtime and e2e tests.

They follow ``fldsl/artifacts.py`` exactly, like the compiler's output, so the runtime can be tested without
the compiler: small configs, generated data, flows named ``src->dst:tensor``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fldsl.artifacts import (
    AggregationSpec,
    AlignmentSpec,
    AttestationRequirement,
    DataSpec,
    Flow,
    Identity,
    LossSpec,
    OpCall,
    OptimizerSpec,
    PeerRef,
    Pins,
    Plan,
    Policy,
    ShardingSpec,
    Task,
    TensorSpec,
    TrainSpec,
    ValidationSpec,
    dump_json,
    node_dir,
)
from fldsl.measurement import code_digest, sim_mr_enclave

F32 = "float32"
I64 = "int64"


def spec(shape: list[int | None], dtype: str = F32) -> TensorSpec:
    return TensorSpec(shape=shape, dtype=dtype)


def flow(src: str, dst: str, tensor: str, kind: str, s: TensorSpec | None = None,
         max_bytes: int = 8 << 20) -> Flow:
    return Flow(id=f"{src}->{dst}:{tensor}", tensor=tensor, kind=kind, src=src, dst=dst, spec=s,
                max_bytes=max_bytes, rule=f"allow {src.split('.')[0]} -> {dst.split('.')[0]}: {tensor}")


def summary_flow(worker: str, server: str, curves: int = 1) -> Flow:
    """A worker's holdout summary flow as the compiler emits it (compiler/flows.py, FlowBuilder.metrics)."""
    from fldsl.compiler.flows import METRIC_BINS, bound

    s = spec([1 + 2 * curves, METRIC_BINS], "float64")
    return flow(worker, server, "metrics", "metrics", s, bound(s.nbytes(1)))


def control_pair(a: str, b: str) -> list[Flow]:
    return [flow(a, b, "control", "control", None, 4 << 20), flow(b, a, "control", "control", None, 4 << 20)]


def render_manifest(pipeline: str, node: str, plan_bytes: bytes, policy_bytes: bytes) -> tuple[str, str]:
    from fldsl.compiler.manifest import ManifestInputs, TrustedFile, render_node_manifest

    inputs = ManifestInputs(pipeline=pipeline, node_id=node, isv_prod_id=1, isv_svn=1, node_files=[
        TrustedFile(uri="file:node/plan.json", sha256=hashlib.sha256(plan_bytes).hexdigest()),
        TrustedFile(uri="file:node/policy.json", sha256=hashlib.sha256(policy_bytes).hexdigest()),
    ])
    out = render_node_manifest(inputs)
    return out.template, out.toml


def write_build(root: Path, plans: list[Plan], flows: list[Flow], *, mode: str = "sim",
                max_message_bytes: int = 4 << 20) -> Path:
    """Write plan/policy/manifest of every node, then the same pins.json into each node dir."""
    pipeline = plans[0].pipeline
    build = root / "build" / pipeline
    pins_nodes: dict[str, Identity] = {}
    for plan in plans:
        mine = [f for f in flows if plan.node in (f.src, f.dst)]
        plan.sends = sorted(f.id for f in mine if f.src == plan.node)
        plan.receives = sorted(f.id for f in mine if f.dst == plan.node)
        if plan.role.startswith("vertical.") and not plan.tasks:
            plan.tasks = split_tasks(plan, mine)
        policy = Policy(pipeline=pipeline, node=plan.node,
                        attestation=AttestationRequirement(mode=mode),
                        accept_peers=sorted(p.id for p in plan.peers), flows=mine,
                        max_message_bytes=max_message_bytes)
        d = node_dir(build, plan.node)
        d.mkdir(parents=True, exist_ok=True)
        plan_b, policy_b = dump_json(plan).encode(), dump_json(policy).encode()
        (d / "plan.json").write_bytes(plan_b)
        (d / "policy.json").write_bytes(policy_b)
        template, toml = render_manifest(pipeline, plan.node, plan_b, policy_b)
        short = plan.node.split(".", 1)[1]
        (d / f"{short}.manifest.template").write_text(template)
        (d / f"{short}.manifest.toml").write_text(toml)
        # The uncached code digest: the files may have changed since this process started (the node
        # processes measure the code as it is when they start).
        measured = sim_mr_enclave(toml.encode(), code_digest.__wrapped__())
        pins_nodes[plan.node] = Identity(mr_enclave=[measured], isv_prod_id=1, isv_svn_min=1)
    pins = Pins(pipeline=pipeline, nodes=pins_nodes)
    for plan in plans:
        (node_dir(build, plan.node) / "pins.json").write_text(dump_json(pins))
    return build


def split_tasks(plan: Plan, flows: list[Flow]) -> list[Task]:
    """A vertical node's step tasks as compiler/lower.py writes them: the runtime executes these."""
    node = plan.node
    out: list[Task] = []

    def add(kind: str, name: str, **params: Any) -> None:
        out.append(Task(id=f"{node}/{kind}:{name}", kind=kind, params=params))  # type: ignore[arg-type]

    def wire(kind: str, f: Flow) -> None:
        add(kind, f"{f.tensor}@{f.dst if kind == 'send' else f.src}", flow=f.id)

    cuts = [f for f in flows if f.kind in ("activation", "data")]
    grads = [f for f in flows if f.kind == "gradient"]
    wrt = {g.tensor: next(f.tensor for f in cuts if g.tensor == f"grad({f.tensor})"
                          and (f.src, f.dst) == (g.dst, g.src)) for g in grads}
    if plan.role == "vertical.active":
        for f in cuts:
            wire("recv", f)
        for op in plan.model:
            add("forward", op.output)
        add("loss", "loss")
        add("backward", "top", wrt=wrt)
        for f in grads:
            wire("send", f)
        add("apply", "opt")
        add("evaluate", "holdout")
    else:
        for op in plan.model:
            add("forward", op.output)
        for f in cuts:
            wire("send", f)
        for f in grads:
            wire("recv", f)
        if grads:
            add("backward", "bottom", wrt=wrt)
            add("apply", "opt")
    add("checkpoint", "state")
    if plan.export:
        add("export", "model")
    return out


def _recompile(build: Path, node: str, file: str, model: Any, edit: Any) -> None:
    """Change one node's plan or policy as a compile would: new manifest, new pins everywhere."""
    d = node_dir(build, node)
    doc = model.model_validate_json((d / file).read_bytes())
    edit(doc)
    (d / file).write_text(dump_json(doc))
    rehash_manifest(build, node)
    toml = next(d.glob("*.manifest.toml")).read_bytes()
    pins = Pins.model_validate_json((d / "pins.json").read_bytes())
    pins.nodes[node].mr_enclave = [sim_mr_enclave(toml, code_digest.__wrapped__())]
    for nd in (build / "nodes").iterdir():
        (nd / "pins.json").write_text(dump_json(pins))


def recompile_policy(build: Path, node: str, edit: Any) -> None:
    _recompile(build, node, "policy.json", Policy, edit)


def recompile_plan(build: Path, node: str, edit: Any) -> None:
    _recompile(build, node, "plan.json", Plan, edit)


def rehash_manifest(build: Path, node: str) -> None:
    """Re-render a node's manifest after its plan/policy changed (what an attacker on the host would do so
    the node starts); pins are NOT updated, so peers must refuse the new measurement."""
    d = node_dir(build, node)
    plan_b, policy_b = (d / "plan.json").read_bytes(), (d / "policy.json").read_bytes()
    pipeline = Plan.model_validate_json(plan_b).pipeline
    _, toml = render_manifest(pipeline, node, plan_b, policy_b)
    short = node.split(".", 1)[1]
    (d / f"{short}.manifest.toml").write_text(toml)


# ---------------------------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------------------------


def vertical_build(root: Path, *, rows: int = 600, features: int = 8, epochs: int = 2, batch: int = 64,
                   lr: float = 0.01, checkpoint_every: int | None = None, method: str = "psi_ecdh",
                   seed: int = 3, validation: float = 0.2, passives: int = 1, pipeline: int = 0) -> Path:
    """shop (active, labels) + ``media`` (passive) or ``media1``..``mediaN`` (N passives, same generator);
    ``pipeline`` = ``train.pipeline`` (1: the passives run one step ahead)."""
    active = "shop.trainer"
    names = ["media"] if passives == 1 else [f"media{i}" for i in range(1, passives + 1)]
    emb_dim = 4
    train = TrainSpec(epochs=epochs, batch_size=batch, seed=seed,
                      optimizer=OptimizerSpec(name="adam", params={"learning_rate": lr}),
                      checkpoint_every_steps=checkpoint_every, metrics=["loss", "auc"],
                      validation=ValidationSpec(fraction=validation, seed=seed), pipeline=pipeline)
    gen = {"rows": rows, "seed": 7, "features": features}
    act = spec([None, 16])
    plans: list[Plan] = []
    flows: list[Flow] = []
    acts: list[str] = []
    for k, party in enumerate(names):
        node = f"{party}.trainer"
        ds = "impressions" if passives == 1 else f"impressions{k + 1}"
        a = "act1" if passives == 1 else f"act_{party}"
        acts.append(a)
        data = DataSpec(name=ds, reader="wide_n_deep", params={**gen, "side": "follower"},
                        id_column="example_id", fields={"sparse": spec([None, features], I64)})
        ops = [
            OpCall(output=f"{party}_emb", op="embed", inputs=[f"{ds}.sparse"],
                   params={"buckets": 101, "dim": emb_dim}, spec=spec([None, features * emb_dim]),
                   party=party),
            OpCall(output=a, op="mlp", inputs=[f"{party}_emb"], params={"units": [16], "activation": "relu"},
                   spec=act, party=party),
        ]
        align = AlignmentSpec(method=method, key="example_id", parties=[active, node])
        plans.append(Plan(pipeline="vertical_test", node=node, party=party, role="vertical.passive",
                          peers=[PeerRef(id=active, party="shop", dial=True)], data=[data], alignment=align,
                          model=ops, train=train, tasks=[], export=f"{node}/model"))
        flows += [
            flow(node, active, a, "activation", act, batch * 16 * 4 + 256),
            flow(active, node, f"grad({a})", "gradient", act, batch * 16 * 4 + 256),
            flow(node, active, "psi", "psi"), flow(active, node, "psi", "psi"),
            *control_pair(active, node),
        ]
    shop_data = DataSpec(name="conversions", reader="wide_n_deep", params={**gen, "side": "leader"},
                         id_column="example_id", fields={"sparse": spec([None, features], I64),
                                                         "label": spec([None], I64)})
    shop_ops = [
        OpCall(output="s_emb", op="embed", inputs=["conversions.sparse"],
               params={"buckets": 101, "dim": emb_dim}, spec=spec([None, features * emb_dim]), party="shop"),
        OpCall(output="s_bottom", op="mlp", inputs=["s_emb"], params={"units": [16], "activation": "relu"},
               spec=spec([None, 16]), party="shop"),
        OpCall(output="joined", op="concat", inputs=["s_bottom", *acts], params={},
               spec=spec([None, 16 * (1 + len(acts))]), party="shop"),
        OpCall(output="logits", op="dense", inputs=["joined"],
               params={"units": [16, 2], "activation": "relu"}, spec=spec([None, 2]), party="shop"),
    ]
    loss = LossSpec(op="softmax_cross_entropy", logits="logits", label="conversions.label", party="shop")
    align = AlignmentSpec(method=method, key="example_id", parties=[active, *(f"{n}.trainer" for n in names)])
    plans.append(Plan(pipeline="vertical_test", node=active, party="shop", role="vertical.active",
                      peers=[PeerRef(id=f"{n}.trainer", party=n, dial=False) for n in names],
                      data=[shop_data],
                      alignment=align, model=shop_ops, loss=loss, train=train, tasks=[],
                      export=f"{active}/model"))
    return write_build(root, plans, flows)


def vertical_csv_build(root: Path, labels: dict[int, str], *, loss: str = "softmax_cross_entropy",
                       classes: int = 2, rows: int = 60, features: int = 8) -> Path:
    """``vertical_build`` with the label owner (shop) reading a csv file: the generator's leader rows (ids,
    slot values as float features ``f0``...) and its 0/1 labels in column ``y``, except row i's label cell
    is ``labels[i]``. Shop's model: mlp(features) joined with media's activations, logits of width
    ``classes`` (1 for sigmoid_cross_entropy)."""
    from fldsl.runtime.datagen import wide_n_deep

    table = wide_n_deep(rows, 7, "leader", features)
    cols = [f"f{i}" for i in range(features)]
    lines = [",".join(["example_id", "y", *cols])]
    for i, (rid, y, x) in enumerate(zip(table.ids.tolist(), table.fields["label"].tolist(),
                                         table.fields["sparse"].tolist(), strict=True)):
        lines.append(",".join([str(rid), labels.get(i, str(y)), *(str(v) for v in x)]))
    csv_path = root / "data" / "conversions.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text("\n".join(lines) + "\n")
    build = vertical_build(root, rows=rows, features=features, epochs=1, batch=16)
    width = 1 if loss == "sigmoid_cross_entropy" else classes

    def edit(plan: Plan) -> None:
        plan.data = [DataSpec(name="conversions", reader="csv", path=str(csv_path), id_column="example_id",
                              label_column="y", feature_columns=cols,
                              fields={"features": spec([None, features]), "label": spec([None], I64)})]
        plan.model = [
            OpCall(output="s_bottom", op="mlp", inputs=["conversions.features"],
                   params={"units": [16], "activation": "relu"}, spec=spec([None, 16]), party="shop"),
            OpCall(output="joined", op="concat", inputs=["s_bottom", "act1"], params={},
                   spec=spec([None, 32]), party="shop"),
            OpCall(output="logits", op="dense", inputs=["joined"], params={"units": [16, width],
                   "activation": "relu"}, spec=spec([None, width]), party="shop"),
        ]
        plan.loss = LossSpec(op=loss, logits="logits", label="conversions.label", party="shop")

    recompile_plan(build, "shop.trainer", edit)
    return build


def _mlp_ops(ds: str, n_features: int, units: list[int], party: str) -> list[OpCall]:
    return [OpCall(output="logits", op="dense", inputs=[f"{ds}.features"],
                   params={"units": units, "activation": "relu"}, spec=spec([None, units[-1]]), party=party)]


def horizontal_build(root: Path, *, workers: int = 2, rows: int = 300, mode: str = "sync",
                     epochs: int = 2, batch: int = 32, every_steps: int | None = None,
                     checkpoint_every: int | None = None, lr: float = 0.05, seed: int = 1,
                     summaries: bool = False) -> Path:
    """Workers with CSV-free generated data: criteo parts, a small dense model on the 13 dense features.
    ``summaries``: with the compiler's `metrics` flows (holdout summaries for the server's combined
    metrics)."""
    server = "hub.ps"
    wids = [f"bank{i}.worker" for i in range(1, workers + 1)]
    train = TrainSpec(epochs=epochs, batch_size=batch, seed=seed,
                      optimizer=OptimizerSpec(name="sgd", params={"learning_rate": lr}),
                      checkpoint_every_steps=checkpoint_every, metrics=["loss", "auc"],
                      validation=ValidationSpec(fraction=0.2, seed=seed))
    agg = AggregationSpec(server=server, workers=wids, mode=mode, every_steps=every_steps,
                          every_epoch=mode == "fedavg" and every_steps is None)
    ops = [OpCall(output="logits", op="dense", inputs=["clicks.dense"],
                  params={"units": [8, 2], "activation": "relu"}, spec=spec([None, 2]), party="bank")]
    loss = LossSpec(op="softmax_cross_entropy", logits="logits", label="clicks.label", party="bank")
    plans, flows = [], []
    for i, w in enumerate(wids):
        data = DataSpec(name="clicks", reader="criteo",
                        params={"rows": rows, "seed": 5, "part": i, "parts": workers, "buckets": 1000},
                        fields={"dense": spec([None, 13]), "label": spec([None], I64)})
        plans.append(Plan(pipeline="horizontal_test", node=w, party=w.split(".")[0], role="horizontal.worker",
                          peers=[PeerRef(id=server, party="hub", dial=True)], data=[data], model=ops,
                          loss=loss, train=train, aggregation=agg, tasks=[], export=None))
        up = "gradients" if mode == "sync" else "weights"
        flows += [flow(w, server, up, up if mode == "sync" else "weights"),
                  flow(server, w, "weights", "weights"), *control_pair(server, w)]
        flows += [summary_flow(w, server)] if summaries else []
    plans.append(Plan(pipeline="horizontal_test", node=server, party="hub", role="horizontal.server",
                      peers=[PeerRef(id=w, party=w.split(".")[0], dial=False) for w in wids], data=[],
                      model=ops, loss=loss, train=train, aggregation=agg, tasks=[], export=f"{server}/model"))
    return write_build(root, plans, flows)


def distributed_build(root: Path, *, workers: int = 2, rows: int = 400, epochs: int = 1, batch: int = 32,
                      seed: int = 1, summaries: bool = False) -> Path:
    chief, server = "owner.chief", "cloud.ps"
    wids = [f"cloud.worker{i}" for i in range(1, workers + 1)]
    train = TrainSpec(epochs=epochs, batch_size=batch, seed=seed,
                      optimizer=OptimizerSpec(name="sgd", params={"learning_rate": 0.05}),
                      metrics=["loss", "auc"], validation=ValidationSpec(fraction=0.2, seed=seed))
    agg = AggregationSpec(server=server, workers=wids, mode="sync")
    sharding = ShardingSpec(chief=chief, workers=wids, strategy="round_robin")
    data = DataSpec(name="clicks", reader="criteo", params={"rows": rows, "seed": 5, "buckets": 1000},
                    fields={"dense": spec([None, 13]), "label": spec([None], I64)})
    ops = [OpCall(output="logits", op="dense", inputs=["clicks.dense"],
                  params={"units": [8, 2], "activation": "relu"}, spec=spec([None, 2]), party="cloud")]
    loss = LossSpec(op="softmax_cross_entropy", logits="logits", label="clicks.label", party="cloud")
    plans = [Plan(pipeline="distributed_test", node=chief, party="owner", role="distributed.chief",
                  peers=[PeerRef(id=w, party="cloud", dial=True) for w in wids], data=[data], model=[],
                  train=train, sharding=sharding, tasks=[])]
    flows: list[Flow] = []
    for w in wids:
        plans.append(Plan(pipeline="distributed_test", node=w, party="cloud", role="distributed.worker",
                          peers=[PeerRef(id=chief, party="owner", dial=False),
                                 PeerRef(id=server, party="cloud", dial=True)],
                          data=[data], model=ops, loss=loss, train=train, aggregation=agg, sharding=sharding,
                          tasks=[]))
        flows += [flow(chief, w, "shard", "data"), *control_pair(chief, w),
                  flow(w, server, "gradients", "gradients"), flow(server, w, "weights", "weights"),
                  *control_pair(server, w)]
        flows += [summary_flow(w, server)] if summaries else []
    plans.append(Plan(pipeline="distributed_test", node=server, party="cloud", role="distributed.server",
                      peers=[PeerRef(id=w, party="cloud", dial=False) for w in wids], data=[], model=ops,
                      loss=loss, train=train, aggregation=agg, sharding=sharding, tasks=[],
                      export=f"{server}/model"))
    return write_build(root, plans, flows)


def run_args(**kw: Any) -> dict[str, Any]:
    return kw
