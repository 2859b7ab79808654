"""Scenario rules, node roles and the cross-node flows, each checked against the trust block.

Information flow: every tensor carries the private sources it depends on (``party.dataset.field``, with
the path it took through the model). A flow that moves a value to another party needs an ``allow`` rule
naming that tensor; ``grad(X)`` — the gradient of a cut tensor, returned by the label owner — always
carries the label. Protocol flows (PSI messages authorised by the ``align`` statement, the stratified
holdout authorised by ``validation:``, iteration control and the workers' holdout summaries) need no
rule and say so in their ``rule`` field. A violation is reported with the path, e.g.
``shop.conversions.label → loss → grad(act1) → media (no allow rule)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from fldsl.artifacts import (
    _DTYPE_SIZE,
    POOLED_STATS,
    AggregationSpec,
    AlignmentSpec,
    Flow,
    Role,
    ShardingSpec,
    TensorSpec,
    TrainSpec,
)
from fldsl.compiler import ast
from fldsl.compiler.flow_rules import PendingFlow, apply_rules
from fldsl.compiler.ir import IRNode
from fldsl.stdlib.signatures import fmt_spec

if TYPE_CHECKING:
    from fldsl.compiler.checkstate import CheckState, Tensor

# (worker, server) roles of the parameter-server scenarios.
_PS_ROLES: dict[str, tuple[Role, Role]] = {
    "horizontal": ("horizontal.worker", "horizontal.server"),
    "distributed": ("distributed.worker", "distributed.server"),
}
HEADER_BYTES = 4096  # allowance for framing, names, dtype/shape metadata
CONTROL_BYTES = 64 * 1024
PSI_BYTES_PER_ID = 96  # an encoded curve point plus framing
# Equal score bins over [0, 1] of the holdout summaries' histograms: the aggregator's AUC is within
# sum_b P_b N_b / (2 P N) of the exact one (fldsl.stdlib.tf.metrics.binned_auc), 1/1000-wide bins keep that
# small for any reasonably spread score, and a binary summary stays under 28 KiB.
METRIC_BINS = 1000


def bound(n: int) -> int:
    """A message size limit: ``n`` plus the header allowance, rounded up to KiB."""
    return -(-(n + HEADER_BYTES) // 1024) * 1024


class FlowBuilder:
    def __init__(self, checker: CheckState, train: TrainSpec):
        self.c = checker
        self.train = train
        self.nodes: list[IRNode] = []
        self.alignment: AlignmentSpec | None = None
        self.aggregation: AggregationSpec | None = None
        self.sharding: ShardingSpec | None = None
        self.pending: list[PendingFlow] = []
        self.deferred: list[tuple[ast.Span, str]] = []
        self.violations: list[dict[str, str]] = []  # refused flows, for drawing them in red

    # --- common ----------------------------------------------------------------------------------------
    def build(self) -> list[Flow]:
        getattr(self, self.c.scenario)()
        self.c.fail_if_errors()
        flows = apply_rules(self.c, self.pending, self.violations)
        # Structural errors about flows come after the information-flow errors on the same flows.
        for span, msg in self.deferred:
            self.c.error(span, msg)
        return sorted(flows, key=lambda f: f.id)

    def add(
        self,
        tensor: str,
        kind: str,
        src: str,
        dst: str,
        max_bytes: int,
        *,
        spec: TensorSpec | None = None,
        path: list[str] | None = None,
        span: ast.Span | None = None,
        rule: str = "",
        rule_span: str | None = None,
        raw: bool = False,
    ) -> None:
        flow = Flow(
            id=f"{src}->{dst}:{tensor}",
            tensor=tensor,
            kind=kind,  # type: ignore[arg-type]
            src=src,
            dst=dst,
            spec=spec,
            max_bytes=max_bytes,
            rule=rule,
            rule_span=rule_span,
        )
        self.pending.append(PendingFlow(flow, path, span, raw))

    def control(self, a: str, b: str) -> None:
        for s, d in ((a, b), (b, a)):
            # What it carries: the roles' JSON control messages (resume agreement, restarts, step
            # acknowledgements, schedules), not iteration markers.
            self.add("control", "control", s, d, CONTROL_BYTES,
                     rule="(protocol) run control: resume, restarts, acknowledgements (JSON)")

    def metrics(self, worker: str, server: str, source: str) -> None:
        """A worker's holdout summary to its aggregator, once per epoch (layout: fldsl.stdlib.tf.metrics):
        float64[1 + 2K, METRIC_BINS] of counts and sums, K class curves (0 without `auc`, 1 binary, C for
        C > 2 classes). It is derived from the worker's labels (``source``) but aggregated over its holdout
        rows, so it is a protocol flow like iteration control: no allow rule, and the rule text says what
        it carries. Its fixed spec lets the receiver's flow guard refuse any other shape or size."""
        k = self.metric_curves()
        spec = TensorSpec(shape=[1 + 2 * k, METRIC_BINS], dtype="float64")
        what = f", {k} class score histogram pair(s) of {METRIC_BINS} bins" if k else ""
        self.add(
            "metrics",
            "metrics",
            worker,
            server,
            bound(spec.nbytes(1)),
            spec=spec,
            rule=f"(protocol) epoch summary of {source}: holdout row, loss and correct-row totals, training "
            f"loss sum{what}; no rows or per-row labels",
        )

    def metric_curves(self) -> int:
        """K of the holdout summary: AUC needs a (positives, negatives) histogram pair per class curve."""
        if self.c.loss.op == "mse" or "auc" not in self.train.metrics:
            return 0
        classes = self.c.logits_t.spec.shape[-1] or 1
        return 1 if classes <= 2 else classes

    def one_node(self, party: str, why: str) -> str | None:
        p = self.c.parties[party]
        if len(p.nodes) != 1:
            self.c.error(
                p.span,
                f"party `{party}` runs one node {why}; it declares {len(p.nodes)} ({', '.join(p.nodes)})",
            )
            return None
        return f"{party}.{p.nodes[0]}"

    def weights_bytes(self) -> int:
        # float32 parameters plus a small per-variable allowance (name, shape).
        return 4 * sum(self.c.param_counts.values()) + 64 * len(self.c.param_counts)

    def row_bytes(self, fields: dict[str, TensorSpec]) -> int:
        total = 0
        for spec in fields.values():
            width = 1
            for d in spec.shape[1:]:
                width *= d or 1
            total += width * _DTYPE_SIZE.get(spec.dtype, 8)
        return total

    def input_specs(self, ops: list[str]) -> dict[str, TensorSpec]:
        produced = set(ops)
        out: dict[str, TensorSpec] = {}
        for op in self.c.ops:
            if op.output not in produced:
                continue
            for ref in op.inputs:
                if ref not in produced:
                    out[ref] = self.c.tensors[ref].spec
        return dict(sorted(out.items()))

    def label_source(self, party: str) -> str:
        return f"{party}.{self.c.label_t.name}"

    # --- vertical --------------------------------------------------------------------------------------
    def vertical(self) -> None:
        c = self.c
        label_party = c.label_t.party
        assert label_party is not None
        c.loss.party = label_party
        ops_at: dict[str, list[str]] = {}
        for op in c.ops:
            ops_at.setdefault(op.party, []).append(op.output)
        # A party without ops still takes part when another party's op reads one of its raw fields (an
        # `allow media -> shop: impressions.sparse` rule): it sends that field, nothing comes back.
        feeds = {t.party for op in c.ops for ref in op.inputs
                 if (t := c.tensors[ref]).raw and t.party is not None and t.party != op.party}
        node_of = self._vertical_parties(ops_at, feeds, label_party)
        if label_party not in node_of:
            return
        leader = node_of[label_party]
        passives = [n for p, n in node_of.items() if p != label_party]
        if not passives:
            c.error(
                c.partition.span,
                f"a vertical pipeline needs at least one party besides the label owner `{label_party}`",
            )
            return
        self._align(node_of, label_party)

        logits = self._vertical_cuts(node_of, label_party)
        for p in passives:
            self.control(leader, p)
        self._vertical_holdout(leader, passives, label_party)
        self._vertical_nodes(node_of, ops_at, label_party, logits)

    def _vertical_parties(
        self, ops_at: dict[str, list[str]], feeds: set[str], label_party: str
    ) -> dict[str, str]:
        """Each party that takes part in the model -> its one node (the others reported)."""
        c = self.c
        node_of: dict[str, str] = {}
        for pname in c.parties:
            if pname not in ops_at and pname not in feeds and pname != label_party:
                c.error(
                    c.parties[pname].span,
                    f"party `{pname}` takes no part in the model",
                    "place a model statement there (`at PARTY: ...`) or remove the party",
                )
                continue
            n = self.one_node(pname, "in a vertical pipeline")
            if n:
                node_of[pname] = n
        return node_of

    def _vertical_cuts(self, node_of: dict[str, str], label_party: str) -> Tensor:
        """The activations (and raw fields) across the cut and their gradients back; returns the logits."""
        c = self.c
        # Cut tensors: used at one party, produced at another.
        cuts: dict[tuple[str, str], tuple[Tensor, ast.Span]] = {}
        for op in c.ops:
            for ref in op.inputs:
                t = c.tensors[ref]
                if t.party is not None and t.party != op.party:
                    cuts.setdefault((ref, op.party), (t, c.op_spans[op.output]))
        logits = c.logits_t
        if logits.party is not None and logits.party != label_party:
            cuts.setdefault((logits.name, label_party), (logits, c.loss_stmt.span))

        batch = self.train.batch_size
        grads: list[tuple[Tensor, str, str]] = []
        for (ref, dst_party), (t, span) in cuts.items():
            src_party = t.party
            assert src_party is not None
            if src_party not in node_of or dst_party not in node_of:
                continue
            src_sources = sorted(t.sources.items())
            path = [*src_sources[0][1], dst_party] if src_sources else [ref, dst_party]
            self.add(
                ref,
                "data" if t.raw else "activation",
                node_of[src_party],
                node_of[dst_party],
                bound(t.spec.nbytes(batch)),
                spec=t.spec,
                path=path,
                span=span,
                raw=t.raw,
            )
            if dst_party != label_party:
                self.deferred.append(
                    (
                        span,
                        f"in a vertical pipeline tensors go to the label owner `{label_party}`; "
                        f"`{ref}` would go from `{src_party}` to `{dst_party}`",
                    )
                )
            elif t.trainable:
                grads.append((t, src_party, dst_party))
        for t, src_party, dst_party in grads:
            self.add(
                f"grad({t.name})",
                "gradient",
                node_of[dst_party],
                node_of[src_party],
                bound(t.spec.nbytes(batch)),
                spec=t.spec,
                path=[self.label_source(label_party), "loss", f"grad({t.name})", src_party],
                span=c.loss_stmt.span,
            )
        return logits

    def _vertical_holdout(self, leader: str, passives: list[str], label_party: str) -> None:
        c = self.c
        val = self.train.validation
        if val.fraction > 0:
            item = c.train_items["validation"]
            rows = max((d.rows or 0) for d in c.parties[label_party].datasets.values())
            for p in passives:
                self.add(
                    "holdout",
                    "control",
                    leader,
                    p,
                    bound(8 * rows),
                    rule=f"validation: {val.fraction} (stratified holdout by id, chosen by the label owner)",
                    rule_span=c.loc(item.span),
                )

    def _vertical_nodes(
        self, node_of: dict[str, str], ops_at: dict[str, list[str]], label_party: str, logits: Tensor
    ) -> None:
        c = self.c
        for pname, nid in node_of.items():
            ops = ops_at.get(pname, [])
            specs = self.input_specs(ops)
            if pname == label_party:
                specs[c.label_t.name] = c.label_t.spec
                if logits.name not in ops:
                    specs[logits.name] = logits.spec
            used = {r.split(".")[0] for r in specs if r.count(".") == 1}
            aligned = {ds for ds in (self.alignment_ds.get(pname) or [])}
            self.nodes.append(
                IRNode(
                    id=nid,
                    party=pname,
                    role="vertical.active" if pname == label_party else "vertical.passive",
                    data=sorted(d for d in c.parties[pname].datasets if d in used | aligned),
                    ops=ops,
                    input_specs=dict(sorted(specs.items())),
                    has_loss=pname == label_party,
                )
            )

    def _align(self, node_of: dict[str, str], label_party: str) -> None:
        c = self.c
        part = c.partition
        assert isinstance(part, ast.VerticalPartition)
        self.alignment_ds: dict[str, list[str]] = {}
        if not part.aligns:
            c.error(
                part.span,
                "a vertical pipeline aligns its parties' rows by id",
                "add `align partyA.dataset, partyB.dataset on ID using psi.ecdh`",
            )
            return
        methods = {"psi.ecdh": "psi_ecdh", "join": "join"}
        key: str | None = None
        method: str | None = None
        rows = 0
        for al in part.aligns:
            m = methods.get(al.method.text)
            if m is None:
                c.unknown(al.method.span, "alignment method", al.method.text, methods)
            elif method is not None and m != method:
                c.error(al.method.span, "every `align` of a pipeline must use the same method")
            else:
                method = m
            if key is not None and al.key.value != key:
                c.error(al.key.span, f"every party is aligned on the same key; earlier `align` used `{key}`")
            key = al.key.value
            for ref in al.datasets:
                if len(ref.parts) != 2:
                    c.error(ref.span, f"`align` takes `party.dataset`, got `{ref.text}`")
                    continue
                pname, dname = ref.parts[0].value, ref.parts[1].value
                if pname not in c.parties:
                    c.unknown(ref.parts[0].span, "party", pname, c.parties)
                    continue
                ds = c.parties[pname].datasets.get(dname)
                if ds is None:
                    known = c.parties[pname].datasets
                    c.unknown_in(ref.parts[1].span, f"party `{pname}`", "data set", dname, known)
                    continue
                if ds.spec.id_column != al.key.value:
                    c.error(
                        ref.span,
                        f"`{pname}.{dname}` has id column `{ds.spec.id_column}`, not `{al.key.value}`",
                        "every party is aligned on the same key (set `id:` of its csv)",
                    )
                    continue
                self.alignment_ds.setdefault(pname, []).append(dname)
                rows = max(rows, ds.rows or 0)
        for pname in node_of:
            if pname not in self.alignment_ds and not c.diags:
                c.error(
                    part.span, f"party `{pname}` is not aligned", "add its data set to an `align` statement"
                )
        if method is None or key is None or (c.diags and any(d.severity == "error" for d in c.diags)):
            return
        leader = node_of[label_party]
        others = [n for p, n in node_of.items() if p != label_party]
        self.alignment = AlignmentSpec(method=method, key=key, parties=[leader, *others])  # type: ignore[arg-type]
        al0 = part.aligns[0]
        text = f"align {', '.join(r.text for r in al0.datasets)} on {al0.key.value} using {al0.method.text}"
        for o in others:
            for s, d in ((leader, o), (o, leader)):
                self.add(
                    "psi", "psi", s, d, bound(PSI_BYTES_PER_ID * rows), rule=text, rule_span=c.loc(al0.span)
                )

    # --- horizontal ------------------------------------------------------------------------------------
    def horizontal(self) -> None:
        c = self.c
        part = c.partition
        assert isinstance(part, ast.HorizontalPartition)
        workers: list[str] = []
        for w in c.roles.worker_parties:
            n = self.one_node(w, "as a horizontal worker")
            if n:
                workers.append(n)
        server = c.roles.server_node
        if len(workers) != len(c.roles.worker_parties):
            return
        used_ds = sorted(
            {r.split(".")[0] for op in c.ops for r in op.inputs if "." in r} | {c.label_t.name.split(".")[0]}
        )
        self._same_schema(c.roles.worker_parties, used_ds, part.span)
        test = self.train.validation.test_data
        test_holders = [w for w in c.roles.worker_parties if test and test in c.parties[w].datasets]
        if test:
            if not test_holders:
                c.error(c.train_items["test"].value.span, f"no worker party holds the test set `{test}`")
            self._same_schema(test_holders, [test], c.train_items["test"].value.span, like=used_ds[0])
        sched = part.schedule
        fedavg = sched.unit != "step" or (part.reduce is not None and part.reduce.value == "fedavg")
        self.aggregation = AggregationSpec(
            server=server,
            workers=workers,
            mode="fedavg" if fedavg else "sync",
            every_steps=(sched.count if sched.unit in ("step", "steps") else None) if fedavg else None,
            every_epoch=sched.unit == "epoch",
            weighting="mean" if part.reduce is not None and part.reduce.value == "mean" else "examples",
        )
        self._ps_flows(workers, server, "gradients" if not fedavg else "weights", part.span)
        self._stats_flows(workers, server, part.span)
        worker_data: dict[str, list[str]] = {}
        for w in workers:
            pname = w.split(".")[0]
            data = [d for d in used_ds if d in c.parties[pname].datasets]
            if pname in test_holders and test not in data:
                data.append(test)  # type: ignore[arg-type]
            worker_data[w] = sorted(data)
        self._whole_model_nodes("horizontal", workers, server, worker_data)

    def _same_schema(
        self, parties: list[str], names: list[str], span: ast.Span, like: str | None = None
    ) -> None:
        c = self.c
        for name in names:
            ref_party = parties[0] if parties else None
            if ref_party is None:
                return
            base = c.parties[ref_party].datasets.get(like or name)
            if base is None:
                continue
            for p in parties:
                ds = c.parties[p].datasets.get(name)
                if ds is None:
                    c.error(
                        span,
                        f"worker party `{p}` has no data set `{name}` (horizontal parties share one schema)",
                    )
                    continue
                if ds.spec.fields != base.spec.fields or ds.spec.feature_columns != base.spec.feature_columns:
                    c.error(
                        span,
                        f"horizontal parties share one schema: `{p}.{name}` has "
                        f"{_schema(ds.spec.fields, ds.spec.feature_columns)} "
                        f"but `{ref_party}.{like or name}` has "
                        f"{_schema(base.spec.fields, base.spec.feature_columns)}",
                    )

    def _ps_flows(self, workers: list[str], server: str, up: str, span: ast.Span) -> None:
        """Workers <-> parameter server: gradients (sync) or weights (FedAvg) up, weights down."""
        c = self.c
        wbytes = bound(self.weights_bytes())
        srv_party = server.split(".")[0]
        for w in workers:
            wp = w.split(".")[0]
            intra = wp == srv_party
            other = next((x.split(".")[0] for x in workers if x != w), wp)
            src_w = self.label_source(wp) if c.scenario == "horizontal" else self._shard_source()
            src_o = self.label_source(other) if c.scenario == "horizontal" else self._shard_source()
            rule = f"(intra-party {wp})" if intra else ""
            self.add(
                up,
                "gradients" if up == "gradients" else "weights",
                w,
                server,
                wbytes,
                path=None if intra else [src_w, "loss", up, srv_party],
                span=span,
                rule=rule,
            )
            self.add(
                "weights",
                "weights",
                server,
                w,
                wbytes,
                path=None if intra else [src_o, "loss", up, f"{server} aggregate", "weights", wp],
                span=span,
                rule=rule,
            )
            self.control(w, server)
            self.metrics(w, server, src_w)

    def _stats_flows(self, workers: list[str], server: str, span: ast.Span) -> None:
        """Horizontal preprocessing: each worker sends the statistics of its pooled training columns
        (``ColumnSpec.pooled``: float64[k, len(POOLED_STATS)], counts, means, spreads, ranges; no row) to
        the aggregator, which sends every worker the merge, so all fit what central training would fit.
        They are derived from a party's columns, so both directions need an allow rule for `stats`."""
        c = self.c
        ds = c.label_t.name.split(".")[0]
        first = c.parties[workers[0].split(".")[0]].datasets.get(ds) if workers else None
        if first is None:
            return
        k = len(first.spec.pooled_columns())
        if k == 0:
            return
        spec = TensorSpec(shape=[k, len(POOLED_STATS)], dtype="float64")
        srv_party = server.split(".")[0]
        for w in workers:
            wp = w.split(".")[0]
            intra = wp == srv_party
            other = next((x.split(".")[0] for x in workers if x != w), wp)
            rule = f"(intra-party {wp})" if intra else ""
            self.add("stats", "stats", w, server, bound(spec.nbytes(1)), spec=spec, span=span, rule=rule,
                     path=None if intra else [f"{wp}.{ds} columns", "training statistics", srv_party])
            self.add("stats", "stats", server, w, bound(spec.nbytes(1)), spec=spec, span=span, rule=rule,
                     path=None if intra else [f"{other}.{ds} columns", "training statistics",
                                              f"{server} merge", "stats", wp])

    # --- distributed -----------------------------------------------------------------------------------
    def _shard_source(self) -> str:
        chief_party = self.c.roles.chief_node.split(".")[0]
        return self.label_source(chief_party)

    def distributed(self) -> None:
        c = self.c
        part = c.partition
        assert isinstance(part, ast.DistributedPartition)
        chief, workers, server = c.roles.chief_node, c.roles.dist_workers, c.roles.server_node
        chief_party = chief.split(".")[0]
        used_ds = sorted(
            {r.split(".")[0] for op in c.ops for r in op.inputs if "." in r} | {c.label_t.name.split(".")[0]}
        )
        datasets = [c.parties[chief_party].datasets[d] for d in used_ds]
        rows = max((d.rows or 0) for d in datasets)
        per_worker = -(-rows // len(workers))
        fields = {f"{d.spec.name}.{k}": v for d in datasets for k, v in d.spec.fields.items()}
        shard_bytes = bound(per_worker * (self.row_bytes(fields) + 16))
        for w in workers:
            wp = w.split(".")[0]
            intra = wp == chief_party
            self.add(
                "shard",
                "data",
                chief,
                w,
                shard_bytes,
                path=None if intra else [self.label_source(chief_party), "shard", wp],
                span=part.span,
                rule=f"(intra-party {wp})" if intra else "",
            )
            self.control(chief, w)
        self.sharding = ShardingSpec(chief=chief, workers=workers, strategy=part.strategy.value)  # type: ignore[arg-type]
        self.aggregation = AggregationSpec(server=server, workers=workers, mode="sync")
        self._ps_flows(workers, server, "gradients", part.span)
        self.nodes.append(IRNode(id=chief, party=chief_party, role="distributed.chief", data=used_ds))
        self._whole_model_nodes("distributed", workers, server, {})

    def _whole_model_nodes(
        self, scenario: Literal["horizontal", "distributed"], workers: list[str], server: str,
        worker_data: dict[str, list[str]],
    ) -> None:
        """Parameter-server scenarios: every worker runs the whole model and the loss; the server holds the
        same variables (it applies the aggregated update)."""
        c = self.c
        all_ops = [op.output for op in c.ops]
        specs = self.input_specs(all_ops)
        specs[c.label_t.name] = c.label_t.spec
        for w in workers:
            self.nodes.append(
                IRNode(id=w, party=w.split(".")[0], role=_PS_ROLES[scenario][0], data=worker_data.get(w, []),
                       ops=all_ops, input_specs=specs, has_loss=True)
            )
        self.nodes.append(
            IRNode(id=server, party=server.split(".")[0], role=_PS_ROLES[scenario][1], ops=all_ops,
                   input_specs=specs)
        )


def _schema(fields: dict[str, TensorSpec], cols: list[str]) -> str:
    parts = [f"{k}: {fmt_spec(v)}" for k, v in sorted(fields.items())]
    if cols:
        shown = ", ".join(cols[:4]) + (", ..." if len(cols) > 4 else "")
        parts.append(f"columns [{shown}]")
    return "{" + "; ".join(parts) + "}"
