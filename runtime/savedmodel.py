"""A node's part of the trained model as a TensorFlow SavedModel plus a model card, packed for export.

At export every node with an export name writes, besides the weights (``<node>_model.sealed``, an ``.npz``),
``<node>_model.savedmodel.sealed`` (and ``.savedmodel.owner`` when the plan names the owner's key): a tar
holding

    saved_model.pb, fingerprint.pb, variables/, assets/   the SavedModel (``tf.saved_model.load(DIR)``)
    model_card.json                                       :func:`model_card` (format ``fldsl.model-card/1``)
    holdout_scores.csv                                    label owner only: ``id,score`` of the run's last
                                                          holdout evaluation (the exported weights)

so ``fldsl model decrypt`` unpacks it into one folder that TensorFlow loads as it is. The pack is sealed under
the export name ``<plan export>/savedmodel``: a weights file cannot be passed off as a SavedModel or back.

The SavedModel is built from the plan's op list by the same stdlib code the roles train with
(``fldsl.stdlib.tf.build_segment``), with the trained weights set; nothing is re-implemented here.

Signature ``serving_default``:

* inputs: one tensor per input of this node's part, named :func:`input_key` of its ref
  (``<dataset>.<field>`` -> ``<dataset>_<field>``; a received tensor keeps its name, e.g. ``act1``). A csv
  data set's ``features`` is a float32 matrix ``[rows, len(feature_columns)]`` whose columns are the plan's
  ``feature_columns`` in that order (the card lists them); generated data sets' fields as the card's specs
  say (e.g. ``sparse`` int64). The label is never an input.
* outputs: the label owner (a plan with a loss whose logits this node computes): ``scores`` (P(class 1)
  for a binary task, class probabilities ``[rows, C]`` for C > 2 classes, the prediction for ``mse``,
  exactly ``fldsl.stdlib.tf.scores``) and ``logits``. A passive party of a vertical split: its activations,
  one output per tensor it sends (e.g. ``act1``), which are the label owner's inputs of the same name.

Preprocessing: a data set whose schema block fits transforms (missing values, scaling, categories;
``fldsl.runtime.preprocess``) takes its **raw cells** instead: its ``features`` input is a string matrix
``[rows, k]``, one column per declared feature column in the plan's order (the card's ``columns``, and
``"raw": true``), each cell as the csv holds it (an empty cell or the declared token is missing). The
serving function applies the node's fitted statistics in TensorFlow (:func:`tf_preprocess`, the same
arithmetic as ``preprocess.apply``: fill, scale and the indicator in float64, one-hot by vocabulary or
FarmHash bucket) before the model's ops, so ``tf.saved_model.load`` scores raw rows exactly as training saw
them; the statistics are the card's ``preprocessing``.

Why ``ram://``: inside an enclave the run folder is on the untrusted host; TensorFlow's in-memory file system
keeps the plaintext SavedModel in enclave memory until it is sealed.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fldsl.artifacts import Plan, Policy, TensorSpec, dump_json

CARD_FORMAT = "fldsl.model-card/1"
CARD_FILE = "model_card.json"
HOLDOUT_FILE = "holdout_scores.csv"
SIGNATURE = "serving_default"
SUFFIX = ".savedmodel"  # models/<node>_model.savedmodel.sealed / .owner
# Refuse packs that would expand beyond this (a decrypted pack comes from the owner's own export, but a
# corrupted or hand-made file should fail cleanly, not fill the disk).
MAX_PACK_BYTES = 16 << 30
_KEY_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelPackError(ValueError):
    """A model pack or card is malformed, or does not fit the build it is used with (user-facing)."""


def export_name(plan_export: str) -> str:
    """The sealing / owner-export name of a node's SavedModel pack."""
    return f"{plan_export}/savedmodel"


def input_key(ref: str) -> str:
    """The signature key of a segment input: TensorFlow keys are identifiers, refs have a dot."""
    return ref.replace(".", "_")


def plan_digest(plan: Plan) -> str:
    """SHA-256 of the canonical plan with its data paths left out: a node may read its files from another
    path than the build's (``fldsl run --data``, the enclave's data mount), and the model is the same."""
    data = [ds.model_copy(update={"path": None}) for ds in plan.data]
    return hashlib.sha256(dump_json(plan.model_copy(update={"data": data})).encode()).hexdigest()


def scores_np(loss_op: str, logits: np.ndarray) -> np.ndarray:
    """What ``fldsl.stdlib.tf.scores`` computes, in numpy (for the holdout file the label owner writes
    from the logits it already has)."""
    logits = np.asarray(logits, dtype=np.float64)
    if loss_op == "softmax_cross_entropy":
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
        return p[:, 1] if p.shape[1] == 2 else p
    if loss_op == "sigmoid_cross_entropy":
        return 1.0 / (1.0 + np.exp(-logits.reshape(-1)))
    return logits.reshape(-1)


def scores_csv(ids: Sequence[Any], scores: np.ndarray) -> str:
    """``id,score`` (``id,score_0,...`` for class probabilities), floats with float32 precision."""
    scores = np.asarray(scores)
    cols = ["score"] if scores.ndim == 1 else [f"score_{k}" for k in range(scores.shape[1])]
    lines = [",".join(["id", *cols])]
    rows = scores.reshape(len(ids), -1)
    for i, row in zip(ids, rows.tolist(), strict=True):
        lines.append(",".join([str(i), *(f"{v:.9g}" for v in row)]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# building the pack (in the node)
# ---------------------------------------------------------------------------------------------------------


def _outputs(plan: Plan, policy: Policy) -> dict[str, str]:
    """Signature output key -> what it is (see the module docstring)."""
    produced = {op.output for op in plan.model}
    if plan.loss is not None and plan.loss.logits in produced:
        return {"scores": "scores", "logits": plan.loss.logits}
    sent = [f.tensor for f in policy.flows
            if f.src == plan.node and f.kind == "activation" and f.tensor in produced]
    if sent:
        return {t: t for t in dict.fromkeys(sent)}
    if plan.loss is None:
        # A synchronous parameter server holds the global model but not the loss (its workers compute it):
        # it serves the model's final output as logits.
        consumed = {ref for op in plan.model for ref in op.inputs}
        final = [op.output for op in plan.model if op.output not in consumed]
        if len(final) == 1:
            return {"logits": final[0]}
    raise ModelPackError(f"{plan.node}: its part of the model has neither the loss's logits nor activations "
                         "it sends; nothing to serve")


def model_card(plan: Plan, policy: Policy, specs: Mapping[str, TensorSpec], refs: Sequence[str],
               outputs: Mapping[str, str], *, metrics: Mapping[str, Any] | None,
               history: Sequence[Mapping[str, Any]] | None, deployment_digest: str | None,
               holdout_rows: int | None,
               preprocessing: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The card: what the model is, where each input comes from, and what the run measured."""
    datasets = {ds.name: ds for ds in plan.data}
    inputs: dict[str, Any] = {}
    for ref in refs:
        ds_name, _, fld = ref.partition(".")
        entry: dict[str, Any] = {"ref": ref, **specs[ref].model_dump(mode="json")}
        ds = datasets.get(ds_name) if fld else None
        if ds is not None or (fld and not any(f.tensor == ref for f in policy.flows)):
            entry["source"] = "data"
            if ds is not None and fld == "features" and ds.feature_columns:
                entry["columns"] = list(ds.feature_columns)
                if preprocessing and ds_name in preprocessing:  # raw cells in (module docstring)
                    entry.update(dtype="string", shape=[None, len(ds.feature_columns)], raw=True)
        else:
            senders = sorted({f.src for f in policy.flows if f.dst == plan.node and f.tensor == ref})
            entry["source"] = senders[0] if len(senders) == 1 else senders
        inputs[input_key(ref)] = entry
    out_specs: dict[str, Any] = {}
    for key, tensor in outputs.items():
        if key == "scores":
            assert plan.loss is not None
            out_specs[key] = {"meaning": _score_meaning(plan), "from": plan.loss.logits}
        else:
            dst = sorted({f.dst for f in policy.flows if f.src == plan.node and f.tensor == tensor})
            out_specs[key] = {"meaning": "activations" if key != "logits" else "logits", "tensor": tensor,
                              **({"sent_to": dst} if dst else {})}
    # Which node holds which part, as far as this node's plan and policy show it: its own ops, and the
    # tensors each peer computes for it (the passives' activations, seen from the label owner); a passive's
    # outputs say which node reads them (`sent_to`).
    parts: dict[str, list[str]] = {plan.node: [op.output for op in plan.model]}
    for ref in refs:
        src = inputs[input_key(ref)]["source"]
        if isinstance(src, str) and src != "data":
            parts.setdefault(src, []).append(ref)
    return {
        "format": CARD_FORMAT,
        "pipeline": plan.pipeline,
        "node": plan.node,
        "party": plan.party,
        "role": plan.role,
        "export": plan.export,
        # The node cannot see pipeline.json (not measured, not in the enclave); its measured plan and policy
        # identify the pipeline, and `fldsl predict` checks them against the build it is given.
        "plan_digest": plan_digest(plan),
        "policy_sha256": hashlib.sha256(dump_json(policy).encode()).hexdigest(),
        "deployment_digest": deployment_digest,
        "signature": {"name": SIGNATURE, "inputs": inputs, "outputs": out_specs},
        "data": [ds.model_dump(mode="json") for ds in plan.data],
        "model": [op.model_dump(mode="json") for op in plan.model],
        "loss": plan.loss.model_dump(mode="json") if plan.loss is not None else None,
        "parts": parts,
        "train": plan.train.model_dump(mode="json"),
        "metrics": dict(metrics or {}),
        "history": [dict(h) for h in history or []],
        "holdout_scores": {"file": HOLDOUT_FILE, "rows": holdout_rows} if holdout_rows is not None else None,
        # The statistics fitted on this node's training rows, per data set (fldsl.preprocessing/1), applied
        # inside the serving function; null where none is declared.
        "preprocessing": {k: dict(v) for k, v in preprocessing.items()} if preprocessing else None,
    }


def _score_meaning(plan: Plan) -> str:
    loss = plan.loss
    assert loss is not None
    if loss.op == "mse":
        return "prediction"
    width = next((op.spec.shape[-1] for op in plan.model if op.output == loss.logits), None)
    if loss.op == "softmax_cross_entropy" and width not in (None, 2):
        return f"class probabilities [rows, {width}]"
    return "P(class 1)"


def tf_preprocess(tf: Any, fitted: Mapping[str, Any], cells: Any) -> Any:
    """The float32 feature matrix ``[rows, width]`` of the string matrix ``cells`` (one column per fitted
    column, in order) under ``fitted`` (``fldsl.preprocessing/1``): ``preprocess.apply`` in TensorFlow,
    from the csv text, with the reader's conventions (cells stripped; empty or the token is missing)."""
    blocks = []
    for i, e in enumerate(fitted["columns"]):
        x = tf.strings.strip(cells[:, i])
        token = (e.get("missing") or {}).get("token")
        miss = tf.equal(x, "")
        if token is not None:
            miss = tf.logical_or(miss, tf.equal(x, str(token)))
        lo, hi = int(e["columns"][0]), int(e["columns"][1])
        if e["type"] == "category":
            x = tf.where(miss, tf.constant(""), x)
            if "vocabulary" in e:
                other = int(e["other_column"])
                vocab = [str(v) for v in e["vocabulary"]]
                if vocab:
                    hit = tf.equal(x[:, None], tf.constant(vocab)[None, :])
                    first = tf.argmax(tf.cast(hit, tf.int32), axis=1, output_type=tf.int64)
                    pos = tf.where(tf.reduce_any(hit, axis=1), first, tf.constant(other, tf.int64))
                else:
                    pos = tf.fill(tf.shape(x), tf.constant(other, tf.int64))
            else:
                pos = tf.strings.to_hash_bucket_fast(x, int(e["hash_buckets"]))
            blocks.append(tf.one_hot(pos, hi - lo, dtype=tf.float32))
            continue
        v = tf.strings.to_number(tf.where(miss, tf.constant("0"), x), out_type=tf.float64)
        if "missing" in e:
            v = tf.where(miss, tf.constant(float(e["missing"]["value"]), tf.float64), v)
        else:
            tf.debugging.assert_equal(tf.reduce_any(miss), False, message=(
                f"column `{e['name']}` has a missing value and no `missing:` fill"))
        sc = e.get("scale")
        if sc is not None:
            if sc["kind"] == "clip":
                v = tf.clip_by_value(v, float(sc["lo"]), float(sc["hi"]))
            else:
                v = (v - float(sc["offset"])) / float(sc["divisor"])
        if "buckets" in e:  # preprocess.apply's searchsorted(side="right"): the count of bounds <= v
            bounds = tf.constant([float(b) for b in e["buckets"]], tf.float64)
            pos = tf.reduce_sum(tf.cast(v[:, None] >= bounds[None, :], tf.int64), axis=1)
            blocks.append(tf.one_hot(pos, len(e["buckets"]) + 1, dtype=tf.float32))
        else:
            blocks.append(tf.cast(v, tf.float32)[:, None])
        if "missing" in e and e["missing"]["indicator"]:
            blocks.append(tf.cast(miss, tf.float32)[:, None])
    return tf.concat(blocks, axis=1) if blocks else tf.zeros([tf.shape(cells)[0], 0], tf.float32)


def _serving_function(tf: Any, segment: Any, plan: Plan, refs: Sequence[str], specs: Mapping[str, TensorSpec],
                      outputs: Mapping[str, str],
                      preprocessing: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    from fldsl.stdlib.tf import scores as tf_scores

    fitted = dict(preprocessing or {})
    # ref -> the fitted transforms of its data set, for the `<data set>.features` of a fitted data set
    raw = {r: fitted[r.partition(".")[0]] for r in refs
           if r.partition(".")[2] == "features" and r.partition(".")[0] in fitted}
    keys = [input_key(r) for r in refs]
    sig = [tf.TensorSpec([None, len(raw[r]["columns"])], tf.string, name=k) if r in raw else
           tf.TensorSpec([None, *specs[r].shape[1:]], tf.as_dtype(specs[r].dtype), name=k)
           for r, k in zip(refs, keys, strict=True)]

    def serve(*args: Any) -> dict[str, Any]:
        values = dict(zip(refs, args, strict=True))
        for ref, fit in raw.items():  # raw cells -> the features the model trained on
            values[ref] = tf_preprocess(tf, fit, values[ref])
        out = segment(values, training=False)
        result = {}
        for key, tensor in outputs.items():
            if key == "scores":
                assert plan.loss is not None
                result[key] = tf_scores(plan.loss, out[plan.loss.logits])
            else:
                result[key] = out[tensor]
        return result

    return tf.function(serve, input_signature=sig)


def build_pack(plan: Plan, policy: Policy, weights: Sequence[np.ndarray], *,
               specs: Mapping[str, TensorSpec] | None = None, metrics: Mapping[str, Any] | None = None,
               history: Sequence[Mapping[str, Any]] | None = None, deployment_digest: str | None = None,
               holdout: tuple[Sequence[Any], np.ndarray] | None = None,
               preprocessing: Mapping[str, Mapping[str, Any]] | None = None) -> bytes:
    """The tar (module docstring) of this node's part with ``weights`` (in ``weight_names`` order).

    ``specs``: the segment's input specs where the plan cannot give them (the horizontal aggregator builds
    its model from its workers' specs); ``holdout``: (ids, logits) of the label owner's last evaluation;
    ``preprocessing``: ``{data set: fitted}`` of this node (``ctx.cache["preprocessing"]``), applied inside
    the serving function to the data set's raw cells."""
    import tensorflow as tf

    from fldsl.runtime.roles.common import input_specs
    from fldsl.stdlib.tf import build_segment

    in_specs = dict(specs) if specs is not None else input_specs(plan, policy)
    segment = build_segment(plan.model, in_specs, seed=plan.train.seed)
    segment.set_weights(list(weights))
    refs = segment.input_refs
    keys = [input_key(r) for r in refs]
    bad = [k for k in keys if not _KEY_OK.match(k)]
    if bad or len(set(keys)) != len(keys):
        raise ModelPackError(f"{plan.node}: inputs {', '.join(refs)} do not give distinct signature keys")
    outputs = _outputs(plan, policy)
    root = tf.Module()
    root.segment_variables = list(segment.variables)  # tracked: the SavedModel must own every variable
    fitted = {k: v for k, v in (preprocessing or {}).items() if f"{k}.features" in refs}
    root.serve = _serving_function(tf, segment, plan, refs, segment.specs, outputs, fitted)
    holdout_csv = None
    if holdout is not None and plan.loss is not None:
        ids, logits = holdout
        holdout_csv = scores_csv(list(ids), scores_np(plan.loss.op, logits))
    card = model_card(plan, policy, segment.specs, refs, outputs, metrics=metrics, history=history,
                      deployment_digest=deployment_digest,
                      holdout_rows=len(holdout[0]) if holdout_csv is not None and holdout else None,
                      preprocessing=fitted)
    base = f"ram://fldsl-export-{secrets.token_hex(8)}"
    try:
        tf.saved_model.save(root, base, signatures={SIGNATURE: root.serve})
        files: dict[str, bytes] = {}
        for folder, _, names in tf.io.gfile.walk(base):
            rel = folder[len(base):].strip("/")
            if rel and not names:
                files[rel + "/"] = b""  # keep empty folders (assets/): TensorFlow expects them
            for name in names:
                with tf.io.gfile.GFile(f"{folder}/{name}", "rb") as g:
                    files[f"{rel}/{name}" if rel else name] = g.read()
    finally:
        if tf.io.gfile.exists(base):
            tf.io.gfile.rmtree(base)
    files[CARD_FILE] = json.dumps(card, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
    if holdout_csv is not None:
        files[HOLDOUT_FILE] = holdout_csv.encode()
    return _tar(files)


def _tar(files: Mapping[str, bytes]) -> bytes:
    """A deterministic tar (no owners, times or modes from the node's host)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 0
            if name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# opening a pack (the owner's side)
# ---------------------------------------------------------------------------------------------------------


def is_pack(data: bytes | bytearray | memoryview) -> bool:
    """Whether decrypted bytes are a model pack (a tar), not a weights ``.npz`` (a zip)."""
    return len(data) > 262 and bytes(data[257:262]) == b"ustar"


def unpack(data: bytes | bytearray | memoryview, dst: Path) -> dict[str, Any]:
    """Write a pack's files into the new folder ``dst`` (0700; files 0600) and return its card.

    Only plain files and folders with relative names inside ``dst`` are accepted; anything else, or a pack
    without a card, is a :class:`ModelPackError` and ``dst`` is removed again."""
    import shutil

    try:
        tar = tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:")
    except tarfile.TarError as e:
        raise ModelPackError(f"not a model pack: {e}") from None
    members = tar.getmembers()
    total = sum(m.size for m in members)
    if total > MAX_PACK_BYTES:
        raise ModelPackError(f"the pack expands to {total:,} bytes, more than {MAX_PACK_BYTES:,}")
    for m in members:
        parts = Path(m.name).parts
        if (not (m.isfile() or m.isdir()) or Path(m.name).is_absolute() or not parts
                or any(p in ("..", "") for p in parts)):
            raise ModelPackError(f"not a model pack: member {m.name!r} is not a plain file inside the pack")
    names = {m.name for m in members}
    if CARD_FILE not in names or "saved_model.pb" not in names:
        raise ModelPackError(f"not a model pack: no {CARD_FILE} / saved_model.pb")
    dst.mkdir(mode=0o700)
    try:
        for m in members:
            target = dst / m.name
            if m.isdir():
                target.mkdir(mode=0o700, parents=True, exist_ok=True)
                continue
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            with open(target, "xb") as out:
                target.chmod(0o600)
                shutil.copyfileobj(src, out)
        return read_card(dst)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def load_in_memory(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], Any]:
    """(card, loaded SavedModel) of a pack, unpacked into TensorFlow's in-memory file system only: a node
    scoring with its sealed model never writes the plaintext model to the host's disk."""
    import tensorflow as tf

    try:
        tar = tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:")
        members = tar.getmembers()
    except tarfile.TarError as e:
        raise ModelPackError(f"not a model pack: {e}") from None
    if sum(m.size for m in members) > MAX_PACK_BYTES:
        raise ModelPackError(f"the pack expands to more than {MAX_PACK_BYTES:,} bytes")
    names = {m.name for m in members}
    if CARD_FILE not in names or "saved_model.pb" not in names:
        raise ModelPackError(f"not a model pack: no {CARD_FILE} / saved_model.pb")
    base = f"ram://fldsl-model-{secrets.token_hex(8)}"
    try:
        card: dict[str, Any] | None = None
        for m in members:
            parts = Path(m.name).parts
            if (not (m.isfile() or m.isdir()) or Path(m.name).is_absolute() or not parts
                    or any(p in ("..", "") for p in parts)):
                raise ModelPackError(f"not a model pack: member {m.name!r} is not a plain file inside the "
                                     "pack")
            if m.isdir():
                tf.io.gfile.makedirs(f"{base}/{m.name}")
                continue
            src = tar.extractfile(m)
            assert src is not None
            blob = src.read()
            if m.name == CARD_FILE:
                try:
                    card = json.loads(blob)
                except ValueError as e:
                    raise ModelPackError(f"unreadable model card: {e}") from None
            tf.io.gfile.makedirs(f"{base}/{Path(m.name).parent}".rstrip("/."))
            with tf.io.gfile.GFile(f"{base}/{m.name}", "wb") as g:
                g.write(blob)
        if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
            raise ModelPackError(f"not a {CARD_FORMAT} card")
        return card, tf.saved_model.load(base)
    finally:
        if tf.io.gfile.exists(base):
            tf.io.gfile.rmtree(base)


def read_card(folder: Path) -> dict[str, Any]:
    path = folder / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelPackError(f"{folder}: no {CARD_FILE} (not a SavedModel exported by fldsl)") from None
    except (OSError, ValueError) as e:
        raise ModelPackError(f"{path}: unreadable model card: {e}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ModelPackError(f"{path}: not a {CARD_FORMAT} card")
    return card


def export_pack(ctx: Any, weights: Sequence[np.ndarray], *, specs: Mapping[str, TensorSpec] | None = None,
                metrics: Mapping[str, Any] | None = None, history: Sequence[Mapping[str, Any]] | None = None,
                holdout: tuple[Sequence[Any], np.ndarray] | None = None) -> Path | None:
    """Seal the node's pack (``models/<node>_model.savedmodel.sealed``) and, when the plan names its owner's
    key, encrypt it to that key (``.savedmodel.owner``), exactly as the weights export; record both in
    ``ctx.exports`` / ``ctx.owner_exports`` under :func:`export_name`. ``ctx`` is the role's RoleContext."""
    plan = ctx.plan
    if plan.export is None:
        return None
    from fldsl.runtime import sealing

    digest = ctx.store.pipeline_digest if ctx.store is not None else None
    data = build_pack(plan, ctx.policy, weights, specs=specs, metrics=metrics, history=history,
                      deployment_digest=digest, holdout=holdout, preprocessing=ctx.cache.get("preprocessing"))
    name = export_name(plan.export)
    safe = plan.export.replace("/", "_") + SUFFIX
    dst = ctx.run_dir / "models" / f"{safe}.sealed"
    dst.parent.mkdir(parents=True, exist_ok=True)
    sealing.seal_file(data, dst, key=ctx.seal_key, node_id=ctx.node, name=name, version=1)
    ctx.exports[name] = str(dst)
    owner: dict[str, str] = {}
    if plan.export_recipient is not None:
        from fldsl.runtime.owner_export import encrypt_file

        owner_dst = dst.with_name(f"{safe}.owner")
        encrypt_file(data, owner_dst, recipient_pem=plan.export_recipient, node_id=ctx.node, name=name)
        ctx.owner_exports[name] = str(owner_dst)
        owner["owner_path"] = str(owner_dst)
    ctx.progress.emit("export", name=name, path=str(dst), **owner)
    return dst
