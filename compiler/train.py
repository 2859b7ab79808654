"""Pass 5, training: the ``train`` block (optimizer, epochs, batches, validation, metrics, pipeline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fldsl.artifacts import (
    OptimizerSpec,
    TrainSpec,
    ValidationSpec,
)
from fldsl.compiler import ast
from fldsl.compiler.checkstate import CheckState, _Fatal, _type_word
from fldsl.compiler.values import BAD, Env, evaluate
from fldsl.stdlib import signatures as sig


def check_train(ck: CheckState, env: Env) -> TrainSpec:
    got = _train_items(ck)
    ck.train_items = got
    vals: dict[str, Any] = {}

    def num(k: str, ptype: str) -> Any:
        it = got.get(k)
        if it is None:
            return None
        if isinstance(it.value, ast.Schedule):
            ck.error(it.value.span, f"`{k}` must be {_type_word(ptype)}")
            return None
        v = evaluate(it.value, ptype, env, f"`{k}`", ck.report)
        return None if v is BAD else v

    for k in ("epochs", "batch_size"):
        if k not in got:
            ck.error(ck.m.trains[0].span, f"the train block needs `{k}`")
        v = num(k, "int")
        if v is not None and v <= 0:
            ck.error(got[k].value.span, f"`{k}` must be positive, got {v}")
        vals[k] = v
    vals["seed"] = num("seed", "int") or 0
    opt = _optimizer(ck, got, env)
    ckpt = _checkpoint(ck, got)
    metrics = _metrics(ck, got, env)
    validation = _validation(ck, got, num, vals["seed"])
    pipeline = check_pipeline(ck, got.get("pipeline"), num, ckpt)
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


def _train_items(ck: CheckState) -> dict[str, ast.TrainItem]:
    """The train block's settings by key (unknown and repeated keys reported)."""
    if not ck.m.trains:
        ck.error(ck.m.name.span, "the pipeline has no `train { ... }` block")
        raise _Fatal
    for extra in ck.m.trains[1:]:
        ck.error(extra.span, "only one `train` block is allowed")
    keys = ("epochs", "batch_size", "optimizer", "seed", "checkpoint", "metrics", "validation", "test",
            "pipeline")
    got: dict[str, ast.TrainItem] = {}
    for item in ck.m.trains[0].items:
        k = item.key.value
        if k not in keys:
            ck.unknown(item.key.span, "train setting", k, keys)
        elif k in got:
            ck.error(item.key.span, f"`{k}` is set twice")
        else:
            got[k] = item
    return got


def _optimizer(ck: CheckState, got: dict[str, ast.TrainItem], env: Env) -> OptimizerSpec:
    opt = OptimizerSpec(name="adam", params={"learning_rate": 0.001})
    if "optimizer" in got:
        ov = got["optimizer"].value
        if not isinstance(ov, ast.Call):
            ck.error(ov.span, "`optimizer` must be a call such as `adam(learning_rate: 0.001)`")
        elif ov.func.value not in sig.OPTIMIZERS:
            ck.unknown(ov.func.span, "optimizer", ov.func.value, sig.OPTIMIZERS)
        else:
            args = ck._bind(ov, sig.OPTIMIZERS[ov.func.value], f"`{ov.func.value}(...)`", env)
            if args is not None:
                if args["learning_rate"] <= 0:
                    ck.error(ov.span, "`learning_rate` must be positive")
                opt = OptimizerSpec(name=ov.func.value, params=args)  # type: ignore[arg-type]
    return opt


def _checkpoint(ck: CheckState, got: dict[str, ast.TrainItem]) -> int | None:
    ckpt: int | None = None
    if "checkpoint" in got:
        cv = got["checkpoint"].value
        if not isinstance(cv, ast.Schedule):
            ck.error(cv.span, "`checkpoint` must be `every N steps` or `every epoch`")
        elif cv.unit != "epoch":
            if (cv.count or 0) <= 0:
                ck.error(cv.span, "the step count must be positive")
            ckpt = cv.count
    return ckpt


def _metrics(ck: CheckState, got: dict[str, ast.TrainItem], env: Env) -> list[str]:
    metrics = ["loss"]
    if "metrics" in got:
        mv = got["metrics"].value
        allowed = ("loss", "auc", "accuracy")
        if not isinstance(mv, ast.ListExpr):
            ck.error(mv.span, "`metrics` must be a list such as `[loss, auc]`")
        else:
            metrics = []
            for x in mv.items:
                v = evaluate(x, "name", env, "a metric", ck.report, allowed)
                loss = getattr(ck, "loss", None)
                if v in ("auc", "accuracy") and loss is not None and loss.op == "mse":
                    # A regression has no classes to rank or to get right; rather than report nothing.
                    ck.error(x.span, f"`{v}` needs a classification loss, but the loss is mse",
                               "keep `loss` (the holdout mean squared error) or use "
                               "softmax_cross_entropy / sigmoid_cross_entropy")
                elif v is not BAD and v not in metrics:
                    metrics.append(v)
    return metrics


def _validation(
    ck: CheckState, got: dict[str, ast.TrainItem], num: Callable[[str, str], Any], seed: int
) -> ValidationSpec:
    validation = ValidationSpec(seed=seed)
    if "validation" in got:
        v = num("validation", "float")
        if v is not None and not 0 < v < 1:
            ck.error(
                got["validation"].value.span, f"`validation` is a held-out fraction in (0, 1), got {v}"
            )
        elif v is not None:
            validation.fraction = v
    if "test" in got:
        tv = got["test"].value
        if not (isinstance(tv, ast.Ref) and len(tv.parts) == 1):
            ck.error(tv.span, "`test` names a data set, e.g. `test: test`")
        elif ck.scenario != "horizontal":
            ck.error(tv.span, "`test:` is for horizontal pipelines; use `validation: FRACTION` here")
        elif not any(tv.text in p.datasets for p in ck.parties.values()):
            ck.unknown(
                tv.span, "data set", tv.text, {d for p in ck.parties.values() for d in p.datasets}
            )
        else:
            validation.test_data = tv.text
    return validation


def check_pipeline(ck: CheckState, item: ast.TrainItem | None, num: Callable[[str, str], Any],
                   ckpt: int | None) -> Literal[0, 1]:
    """``pipeline: 0 | 1``: how far a vertical passive party may run ahead of its gradients (``num``
    evaluates a train setting as a number, reporting a bad one)."""
    if item is None:
        return 0
    if ck.scenario != "vertical":
        # Horizontal/distributed workers have no activations to send ahead: the setting would be
        # silently meaningless there, like `test:` outside horizontal pipelines.
        ck.error(item.key.span, "`pipeline:` is for vertical pipelines (passive parties sending "
                   "activations ahead)", "remove it")
        return 0
    v = num("pipeline", "int")
    if v is None:
        return 0
    if v not in (0, 1):
        ck.error(item.value.span, f"`pipeline` is 0 (lock-step) or 1 (one step ahead), got {v}")
        return 0
    if v == 1 and ckpt == 1:
        ck.warning(item.value.span, "`pipeline: 1` has no effect with `checkpoint: every 1 steps`: "
                     "the pipeline drains at every checkpoint", "checkpoint less often")
    return 1 if v == 1 else 0


