"""A role's outputs: its part of the trained model, sealed (and encrypted to the owner where the plan names
one) plus the SavedModel with its card; a node's fitted preprocessing where another node exports the model."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fldsl.artifacts import TensorSpec
from fldsl.runtime.roles.chunks import savez_named

if TYPE_CHECKING:
    from fldsl.runtime.roles.context import RoleContext


def export_model(ctx: RoleContext, weights: list[np.ndarray], names: list[str], *,
                 specs: dict[str, TensorSpec] | None = None, metrics: dict[str, Any] | None = None,
                 history: list[dict[str, Any]] | None = None,
                 holdout: tuple[Sequence[Any], np.ndarray] | None = None) -> Path | None:
    """Seal the node's part of the trained model under the plan's export name; when the plan names the
    owner's public key (``export_recipient``), also write it encrypted to that key (``<name>.owner``): a
    sealed file opens only inside the enclave (under SGX its key is bound to MRENCLAVE).

    Then the same part as a SavedModel with its model card (``fldsl.runtime.savedmodel.export_pack``):
    ``specs`` where the plan cannot give the model's input specs (the horizontal aggregator), ``metrics`` /
    ``history`` for the card, ``holdout`` = (ids, logits) of the label owner's last holdout evaluation."""
    if ctx.plan.export is None:
        return None
    from fldsl.runtime import sealing

    buf = io.BytesIO()
    members = {f"{i:04d}:{n}": w for i, (n, w) in enumerate(zip(names, weights, strict=True))}
    fitted = ctx.cache.get("preprocessing")
    if fitted:  # the preprocessing fitted on this node's training rows (docs/language.md, "Preprocessing")
        from fldsl.runtime.preprocess import to_bytes

        members["preprocessing"] = np.frombuffer(to_bytes(fitted), dtype=np.uint8)
    savez_named(buf, members)
    safe = ctx.plan.export.replace("/", "_")
    dst = ctx.run_dir / "models" / f"{safe}.sealed"
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = buf.getvalue()
    sealing.seal_file(data, dst, key=ctx.seal_key, node_id=ctx.node, name=ctx.plan.export, version=1)
    ctx.exports[ctx.plan.export] = str(dst)
    owner: dict[str, str] = {}
    if ctx.plan.export_recipient is not None:
        from fldsl.runtime.owner_export import encrypt_file

        owner_dst = dst.with_name(f"{safe}.owner")
        encrypt_file(data, owner_dst, recipient_pem=ctx.plan.export_recipient, node_id=ctx.node,
                     name=ctx.plan.export)
        ctx.owner_exports[ctx.plan.export] = str(owner_dst)
        owner["owner_path"] = str(owner_dst)
    ctx.progress.emit("export", name=ctx.plan.export, path=str(dst), **owner)
    from fldsl.runtime.savedmodel import export_pack

    export_pack(ctx, weights, specs=specs, metrics=metrics, history=history, holdout=holdout)
    return dst


def seal_preprocessing(ctx: RoleContext, fitted: dict[str, Any]) -> Path:
    """``models/<node>_preprocessing.sealed`` (name ``<node>/preprocessing``): this node's fitted
    preprocessing, where the model it trained is exported by another node (the aggregator's)."""
    from fldsl.runtime import sealing
    from fldsl.runtime.preprocess import to_bytes

    name = f"{ctx.node}/preprocessing"
    dst = ctx.run_dir / "models" / f"{name.replace('/', '_')}.sealed"
    dst.parent.mkdir(parents=True, exist_ok=True)
    sealing.seal_file(to_bytes(fitted), dst, key=ctx.seal_key, node_id=ctx.node, name=name, version=1)
    ctx.progress.emit("export", name=name, path=str(dst))
    return dst
