"""A node's data: its data sets loaded (labels checked against the loss), and the declared preprocessing
fitted on its training rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fldsl.artifacts import Plan
from fldsl.runtime.data import LabelRule, load_dataset
from fldsl.runtime.roles.exports import seal_preprocessing

if TYPE_CHECKING:
    from fldsl.runtime.roles.context import RoleContext


def fit_preprocessing(ctx: RoleContext, tables: dict[str, Any], train_rows: dict[str, np.ndarray],
                      apply_to: dict[str, str] | None = None,
                      pooled: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Fit the schema blocks' preprocessing (missing values, scaling, categories) on this node's training
    rows of each data set and make the tables' ``features``; kept in ``ctx.cache["preprocessing"]`` for the
    exported model. A no-op for data sets without any (fldsl.runtime.preprocess)."""
    from fldsl.runtime.preprocess import fit_tables

    fitted = fit_tables(ctx.plan.data, tables, train_rows, apply_to, pooled)
    if fitted:
        ctx.cache["preprocessing"] = fitted
        if ctx.plan.export is None:  # a node without a model export (a horizontal worker): seal the fit alone
            seal_preprocessing(ctx, fitted)
    return fitted


def load_tables(plan: Plan) -> dict[str, Any]:
    """This node's data sets. Those whose labels the loss reads (its label's data set, and a separate test
    set) are checked against the loss's classes, before any alignment or training."""
    rule = label_rule(plan)
    labelled = {plan.loss.label.partition(".")[0]} if plan.loss is not None else set()
    if plan.train.validation.test_data:
        labelled.add(plan.train.validation.test_data)
    return {ds.name: load_dataset(ds, label_rule=rule if ds.name in labelled else None) for ds in plan.data}


def label_rule(plan: Plan) -> LabelRule | None:
    """The label values the plan's loss accepts: 0/1 for sigmoid cross entropy, the classes ``[0, K)`` for
    softmax cross entropy over logits of width K; None for a regression (mse) or no loss."""
    loss = plan.loss
    if loss is None or loss.op not in ("sigmoid_cross_entropy", "softmax_cross_entropy"):
        return None
    if loss.op == "sigmoid_cross_entropy":
        return LabelRule(2, f"a binary task: loss {loss.op}")
    width = next((op.spec.shape[-1] for op in plan.model if op.output == loss.logits and op.spec.shape), None)
    if width is None:  # not in this plan's model (the compiler always puts it there): nothing to check
        return None
    what = "a binary task" if width == 2 else f"{width} classes"
    return LabelRule(width, f"{what}: loss {loss.op} over logits `{loss.logits}` of width {width}")
