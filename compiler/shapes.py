"""Pass 4, types and shapes: data set fields, tensors, op calls and the loss of the model block.
"""

from __future__ import annotations

from typing import Any

from fldsl.artifacts import (
    LossSpec,
    OpCall,
)
from fldsl.compiler import ast
from fldsl.compiler.checkstate import CheckState, Party, Tensor, _Fatal
from fldsl.compiler.values import BAD, Env, describe
from fldsl.diagnostics import Diagnostic
from fldsl.stdlib import signatures as sig


def dataset_field(ck: CheckState, ref: ast.Ref, at: str | None) -> Tensor | None:
    """``ds.field`` as a tensor (the dataset found by scenario rules)."""
    ds_name, field_name = ref.parts[0], ref.parts[1]
    owners = [p for p in ck.parties.values() if ds_name.value in p.datasets]
    all_ds = sorted({d for p in ck.parties.values() for d in p.datasets})
    if not owners:
        known_t = [t for t in ck.tensors if "." not in t]
        ck.unknown(ds_name.span, "data set", ds_name.value, all_ds)
        if ds_name.value in known_t:
            ck.diags[-1] = Diagnostic(
                "error",
                f"`{ds_name.value}` is a tensor, not a data set; it has no field `{field_name.value}`",
                ck.file,
                ds_name.span.line,
                ds_name.span.column,
                ds_name.span.single_line_end,
            )
        return None
    if ck.scenario == "vertical":
        if len(owners) > 1:
            ck.error(
                ds_name.span,
                f"data set `{ds_name.value}` is declared by several parties "
                f"({', '.join(p.name for p in owners)}); give them different names",
            )
            return None
        owner: Party | None = owners[0]
    elif ck.scenario == "horizontal":
        owner = None
        missing = [
            w
            for w in ck.roles.worker_parties
            if ds_name.value not in ck.parties[w].datasets
        ]
        if missing:
            ck.error(
                ds_name.span,
                f"data set `{ds_name.value}` is missing at worker party `{missing[0]}` "
                "(horizontal parties share one schema)",
            )
            return None
        owners = [ck.parties[w] for w in ck.roles.worker_parties]
    else:
        chief_party = ck.roles.chief_node.split(".")[0]
        if ds_name.value not in ck.parties[chief_party].datasets:
            ck.error(
                ds_name.span,
                f"data set `{ds_name.value}` is not held by the chief `{ck.roles.chief_node}` "
                "(in distributed training only the chief has data)",
            )
            return None
        owner = ck.parties[chief_party]
    ds = (owner or owners[0]).datasets[ds_name.value]
    if field_name.value not in ds.spec.fields:
        ck.unknown_in(
            field_name.span, f"data set `{ds_name.value}`", "field", field_name.value, ds.spec.fields
        )
        return None
    party_tag = owner.name if owner else "*"
    src = f"{party_tag}.{ds_name.value}.{field_name.value}"
    t = Tensor(
        name=f"{ds_name.value}.{field_name.value}",
        spec=ds.spec.fields[field_name.value],
        party=owner.name if owner and ck.scenario == "vertical" else None,
        sources={src: [src]},
        trainable=False,
        raw=True,
        span=ref.span,
    )
    return ck.tensors.setdefault(t.name, t)


def tensor_ref(ck: CheckState, ref: ast.Ref, at: str | None) -> Tensor | None:
    if len(ref.parts) == 1:
        t = ck.tensors.get(ref.text)
        if t is None and ref.text in ck.poisoned:
            return None
        if t is None:
            if ref.text in {d for p in ck.parties.values() for d in p.datasets}:
                ck.error(
                    ref.span,
                    f"`{ref.text}` is a data set; use one of its fields, e.g. `{ref.text}.features`",
                )
                return None
            ck.unknown(ref.span, "tensor", ref.text, [k for k in ck.tensors if "." not in k])
            return None
        return t
    if len(ref.parts) == 2:
        return dataset_field(ck, ref, at)
    ck.error(ref.span, f"`{ref.text}` is not a tensor (use `name` or `dataset.field`)")
    return None


def tensor_expr(
    ck: CheckState, expr: Any, at: str | None, target: str, counter: dict[str, int]
) -> Tensor | None:
    if isinstance(expr, ast.Ref):
        return tensor_ref(ck, expr, at)
    if isinstance(expr, ast.Call):
        return op_call(ck, expr, at, target, counter, top=False)
    ck.error(
        expr.span, f"expected a tensor (a name, `dataset.field` or an op call), got {describe(expr)}"
    )
    return None


def op_call(
    ck: CheckState, call: ast.Call, at: str | None, target: str, counter: dict[str, int], top: bool
) -> Tensor | None:
    name = call.func.value
    op = sig.OPS.get(name)
    if op is None:
        _not_an_op(ck, call)
        return None
    if name not in ck.imported:
        ck.error(call.func.span, f"op `{name}` is not imported", f"add `use {op.module}.{{{name}}}`")
    if top:
        out = target
    else:
        counter[name] = counter.get(name, 0) + 1
        out = f"{target}/{name}" + (f"_{counter[name]}" if counter[name] > 1 else "")
    args, inputs = _op_args(ck, op, call, at, target, counter)
    if args is None:
        return None
    try:
        spec = op.shape(args)
        count = op.param_count(args)
    except sig.SignatureError as e:
        ck.error(call.span, f"`{name}`: {e}")
        return None
    if out in ck.tensors:
        ck.error(call.span, f"tensor `{out}` is defined twice")
        return None
    params = {p.name: args[p.name] for p in op.params if not p.is_tensor}
    ck.ops.append(
        OpCall(
            output=out,
            op=name,
            inputs=[t.name for t in inputs],
            params=params,
            spec=spec,
            party=at or "*",
        )
    )
    ck.param_counts[out] = count
    ck.op_spans[out] = call.span
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
    ck.tensors[out] = t
    return t


def _not_an_op(ck: CheckState, call: ast.Call) -> None:
    """Report a call of a name that is no op (a loss, grad, or a typo)."""
    name = call.func.value
    if name in sig.LOSSES:
        ck.error(
            call.func.span, f"`{name}` is a loss; write it as `loss {name}(logits, dataset.label)`"
        )
    elif name == "grad":
        ck.error(
            call.func.span, "`grad(...)` is computed by the compiler; it can only appear in `allow`"
        )
    else:
        ck.unknown(call.func.span, "op", name, sig.OPS)


def _op_args(
    ck: CheckState, op: sig.OpSignature, call: ast.Call, at: str | None, target: str, counter: dict[str, int]
) -> tuple[dict[str, Any] | None, list[Tensor]]:
    """An op call's arguments (tensors as their specs) and its input tensors; None after reporting."""
    name = call.func.value
    inputs: list[Tensor] = []
    if op.variadic:
        args: dict[str, Any] | None = {}
        for a in call.args:
            if a.name is not None:
                ck.error(a.name.span, f"`{name}` takes tensors only, not `{a.name.value}:`")
                args = None
                continue
            t = tensor_expr(ck, a.value, at, target, counter)
            if t is None:
                args = None
            else:
                inputs.append(t)
        if args is not None:
            args["inputs"] = [t.spec for t in inputs]
    else:
        collected: list[Tensor] = []

        def tensor(e: Any) -> Any:
            t = tensor_expr(ck, e, at, target, counter)
            if t is None:
                return BAD
            collected.append(t)
            return t

        env = Env({}, {})
        env.params, env.param_types = ck.env.params, ck.env.param_types
        args = ck._bind(call, op.params, f"`{name}(...)`", env, tensor)
        if args is not None:
            inputs = [args[p.name] for p in op.params if p.is_tensor and args[p.name] is not None]
            args = {k: (v.spec if isinstance(v, Tensor) else v) for k, v in args.items()}
    return args, inputs


def check_model(ck: CheckState, env: Env) -> None:
    ck.env = env
    if not ck.m.models:
        ck.error(ck.m.name.span, "the pipeline has no `model { ... }` block")
        raise _Fatal
    for extra in ck.m.models[1:]:
        ck.error(extra.span, "only one `model` block is allowed")
    block = ck.m.models[0]
    losses = [s for s in block.stmts if isinstance(s, ast.LossStmt)]
    for s in block.stmts:
        if isinstance(s, ast.Assign):
            defined = s.target.value in ck.tensors
            _assign(ck, s)
            if not defined and s.target.value not in ck.tensors:
                ck.poisoned.add(s.target.value)
    if not losses:
        ck.error(
            block.span,
            "the model has no `loss`",
            "add e.g. `loss softmax_cross_entropy(logits, ds.label)`",
        )
        raise _Fatal
    for extra_loss in losses[1:]:
        ck.error(extra_loss.span, "only one `loss` is allowed")
    ck.loss_stmt = losses[0]
    check_loss(ck, losses[0])


def _assign(ck: CheckState, s: ast.Assign) -> None:
    at: str | None = None
    if ck.scenario == "vertical":
        if s.at is None:
            ck.error(
                s.target.span,
                "in a vertical pipeline every model statement says where it runs",
                f"write `at PARTY: {s.target.value} = ...`",
            )
            return
        if s.at.value not in ck.parties:
            ck.unknown(s.at.span, "party", s.at.value, ck.parties)
            return
        at = s.at.value
    elif s.at is not None:
        ck.error(
            s.at.span,
            f"in a {ck.scenario} pipeline every worker runs the whole model; "
            f"remove `at {s.at.value}:`",
        )
    if s.target.value in ck.tensors:
        ck.error(s.target.span, f"tensor `{s.target.value}` is defined twice")
        return
    if not isinstance(s.value, ast.Call):
        ck.error(s.value.span, f"expected an op call, got {describe(s.value)}")
        return
    op_call(ck, s.value, at, s.target.value, {}, top=True)


def check_loss(ck: CheckState, stmt: ast.LossStmt) -> None:
    call = stmt.call
    name = call.func.value
    loss = sig.LOSSES.get(name)
    if loss is None:
        ck.unknown(call.func.span, "loss", name, sig.LOSSES)
        raise _Fatal
    if len(call.args) != 2 or any(
        a.name is not None and a.name.value not in ("logits", "label") for a in call.args
    ):
        ck.error(call.span, f"`{name}` takes two arguments: (logits, dataset.label)")
        raise _Fatal
    by_name = {a.name.value: a for a in call.args if a.name is not None}
    pos = [a for a in call.args if a.name is None]
    logits_arg = by_name.get("logits") or pos.pop(0)
    label_arg = by_name.get("label") or pos.pop(0)
    logits = tensor_expr(ck, logits_arg.value, None, "loss", {})
    if not isinstance(label_arg.value, ast.Ref) or len(label_arg.value.parts) != 2:
        ck.error(label_arg.span, "the label must be a data set field, e.g. `conversions.label`")
        raise _Fatal
    label = dataset_field(ck, label_arg.value, None)
    if logits is None or label is None:
        raise _Fatal
    if not label.name.endswith(".label"):
        ck.error(
            label_arg.span,
            f"`{label.name}` is not a label field (use `{label.name.split('.')[0]}.label`)",
        )
        raise _Fatal
    try:
        loss.check(logits.spec, label.spec)
    except sig.SignatureError as e:
        ck.error(call.span, str(e))
        raise _Fatal from None
    check_label_classes(ck, call.span, name, logits, label)
    ck.logits_t, ck.label_t = logits, label
    party = label.party or "*"
    ck.loss = LossSpec(op=name, logits=logits.name, label=label.name, party=party)


def check_label_classes(ck: CheckState, span: ast.Span, loss: str, logits: Tensor, label: Tensor) -> None:
    """A softmax whose logits width is not the label's class count, where the reader fixes that count
    (generated data); csv labels are checked row by row when the node reads them."""
    if loss != "softmax_cross_entropy":
        return
    ds = label.name.split(".")[0]
    readers = {p.datasets[ds].spec.reader for p in ck.parties.values() if ds in p.datasets}
    for reader in sorted(readers):
        classes = sig.LABEL_CLASSES.get(reader)
        width = logits.spec.shape[-1]
        if classes is not None and width != classes:
            ck.error(span, f"`{label.name}` of a `{reader}` data set has {classes} classes (0 and 1), "
                       f"but the softmax is over {width} logits (`{logits.name}` is "
                       f"{sig.fmt_spec(logits.spec)})",
                       f"make the last layer {classes} units wide, or use sigmoid_cross_entropy over "
                       "1 unit")
            raise _Fatal


