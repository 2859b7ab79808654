"""Scoring new rows with exported SavedModels (``fldsl predict``), on the model owner's machine.

Horizontal and distributed pipelines: one model (the aggregator's export) scores one data set locally.

Vertical pipelines, **split path** (:func:`predict_split`, the default of ``fldsl predict``): every node runs
as its own process with its own model and data and they score over the attested channel
(``fldsl.runtime.roles.predict``). **Owner-side path** (:func:`predict`, ``--local``): every part's SavedModel
is in this one process; each passive part computes its activations for the ids all parts' files share, and
the label owner's part turns them into scores (``id,score``, in the label owner's row order).

Every expected problem is a :class:`PredictError` with a user-facing message and the exit code (2: input,
3: a sealed pack that does not authenticate).
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fldsl.artifacts import FILE_READERS, ArtifactError, DataSpec, Plan, load_model
from fldsl.runtime import savedmodel as sm

BATCH = 8192  # rows per signature call: bounds memory for large files


class PredictError(Exception):
    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Part:
    """One node's opened SavedModel."""

    node: str
    folder: Path
    card: dict[str, Any]
    fn: Any  # the loaded ``serving_default`` signature

    def inputs(self) -> dict[str, dict[str, Any]]:
        return dict(self.card["signature"]["inputs"])

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        n = len(next(iter(feeds.values())))
        chunks: dict[str, list[np.ndarray]] = {}
        for lo in range(0, max(n, 1), BATCH):
            args = {k: tf.constant(v[lo:lo + BATCH].astype(str) if self.inputs()[k]["dtype"] == "string"
                                   else np.asarray(v[lo:lo + BATCH], dtype=self.inputs()[k]["dtype"]))
                    for k, v in feeds.items()}
            for k, v in self.fn(**args).items():
                chunks.setdefault(k, []).append(v.numpy())
        return {k: np.concatenate(v) for k, v in chunks.items()}


def load_plans(build: Path) -> dict[str, Plan]:
    nodes = build / "nodes"
    if not nodes.is_dir():
        raise PredictError(f"{build}: not a build folder (no nodes/; run `fldsl compile`)")
    try:
        return {d.name: load_model(Plan, d / "plan.json") for d in sorted(nodes.iterdir()) if d.is_dir()}
    except ArtifactError as e:
        raise PredictError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------


def open_models(sources: Sequence[Path], plans: Mapping[str, Plan], workdir: Path,
                trust_dir: Path) -> dict[str, Path]:
    """{node: SavedModel folder} from ``sources``: decrypted folders (``fldsl model decrypt``), or run
    folders whose ``models/*.savedmodel.sealed`` are opened with each party's sealing key in
    ``trust_dir/<party>/sealing.key`` (what a local ``fldsl run`` uses) and unpacked under ``workdir``."""
    from fldsl.runtime.sealing import SealError, unseal_file

    found: dict[str, Path] = {}

    def add(node: str, folder: Path, where: Path) -> None:
        if node in found:
            raise PredictError(f"{where}: a second model of {node} (the first: {found[node]})")
        found[node] = folder

    for src in sources:
        if (src / sm.CARD_FILE).is_file():
            card = _card(src)
            add(str(card.get("node")), src, src)
            continue
        models = src / "models"
        packs = sorted(models.glob(f"*{sm.SUFFIX}.sealed")) if models.is_dir() else []
        if not packs:
            raise PredictError(f"{src}: neither a decrypted model folder (no {sm.CARD_FILE}) nor a run "
                               f"folder with models/*{sm.SUFFIX}.sealed")
        by_file = {f"{p.export.replace('/', '_')}{sm.SUFFIX}.sealed": p for p in plans.values() if p.export}
        for pack in packs:
            plan = by_file.get(pack.name)
            if plan is None or plan.export is None:
                raise PredictError(f"{pack}: no node of this build exports it (another pipeline's run?)")
            key_file = trust_dir / plan.party / "sealing.key"
            try:
                key = key_file.read_bytes()
            except OSError as e:
                raise PredictError(f"cannot read {plan.party}'s sealing key {key_file}: {e.strerror} "
                                   "(--trust-dir; or decrypt the model and pass its folder)") from None
            try:
                data = unseal_file(pack, key=key, node_id=plan.node, name=sm.export_name(plan.export))
            except SealError as e:
                code = 2 if e.reason in {"bad-key", "not-sealed", "format"} else 3
                raise PredictError(f"{pack}: {e}", code) from None
            folder = workdir / plan.node
            try:
                sm.unpack(data, folder)
            except sm.ModelPackError as e:
                raise PredictError(f"{pack}: {e}") from None
            add(plan.node, folder, pack)
    return found


def _card(folder: Path) -> dict[str, Any]:
    try:
        return sm.read_card(folder)
    except sm.ModelPackError as e:
        raise PredictError(str(e)) from None


def load_parts(folders: Mapping[str, Path], plans: Mapping[str, Plan]) -> dict[str, Part]:
    """Load each SavedModel after checking that its card was exported by this build's node."""
    import tensorflow as tf

    parts: dict[str, Part] = {}
    for node, folder in folders.items():
        card = _card(folder)
        plan = plans.get(node)
        if plan is None:
            raise PredictError(f"{folder}: the model of {node}, which is not a node of this build "
                               f"(nodes: {', '.join(plans)})")
        if card.get("plan_digest") != sm.plan_digest(plan):
            raise PredictError(f"{folder}: the model of {node} was trained from another plan than this "
                               "build's (recompiled or changed pipeline); use the build it was trained with")
        try:
            fn = tf.saved_model.load(str(folder)).signatures[sm.SIGNATURE]
        except Exception as e:  # TensorFlow raises many types for a damaged SavedModel
            raise PredictError(f"{folder}: not a loadable SavedModel: {e}") from None
        parts[node] = Part(node, folder, card, fn)
    return parts


def open_node_model(source: Path, plan: Plan, seal_key: bytes) -> Part:
    """One node's own part, for the split path (a node started with ``--predict SOURCE``): a folder ``fldsl
    model decrypt`` wrote, the sealed pack ``<node>_model.savedmodel.sealed`` (opened with ``seal_key``, the
    node's own sealing key, into memory only), or a run folder holding that pack. The card must be this
    node's, trained from this plan."""
    from fldsl.runtime.sealing import SealError, unseal_file

    if plan.export is None:
        raise PredictError(f"{plan.node} exports no model: nothing to predict with")
    pack_name = f"{plan.export.replace('/', '_')}{sm.SUFFIX}.sealed"
    if source.is_dir() and not (source / sm.CARD_FILE).is_file():
        source = source / "models" / pack_name
        if not source.is_file():
            raise PredictError(f"{source}: no such file: {plan.node}'s sealed model is not in that run "
                               "folder")
    if source.is_dir():
        card = _card(source)
        loaded: Any = None
    else:
        try:
            data = unseal_file(source, key=seal_key, node_id=plan.node, name=sm.export_name(plan.export))
        except FileNotFoundError:
            raise PredictError(f"{source}: no such file") from None
        except SealError as e:
            code = 2 if e.reason in {"not-sealed", "format"} else 3
            raise PredictError(f"{source}: {e} (is it {plan.node}'s {pack_name}?)", code) from None
        try:
            card, loaded = sm.load_in_memory(data)
        except sm.ModelPackError as e:
            raise PredictError(f"{source}: {e}") from None
    if card.get("node") != plan.node:
        raise PredictError(f"{source}: the model of {card.get('node')}, not of {plan.node}")
    if card.get("plan_digest") != sm.plan_digest(plan):
        raise PredictError(f"{source}: the model of {plan.node} was trained from another plan than this "
                           "build's (another pipeline, or a recompiled or changed one); use the build it was "
                           "trained with")
    if loaded is None:
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(str(source))
        except Exception as e:  # TensorFlow raises many types for a damaged SavedModel
            raise PredictError(f"{source}: not a loadable SavedModel: {e}") from None
    return Part(plan.node, source, card, loaded.signatures[sm.SIGNATURE])


def predict_plan(plan: Plan) -> Plan:
    """The plan a predicting node reads its data with: new rows need no label column, and the training
    file's `rows <= N` does not bound them (see :func:`prediction_spec`)."""
    return plan.model_copy(update={"data": [prediction_spec(ds) for ds in plan.data]})


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------


def parse_bindings(values: Sequence[str]) -> dict[str, str | None]:
    """``party.dataset[=PATH]`` items -> {"party.dataset": PATH or None (the plan's own data)}."""
    out: dict[str, str | None] = {}
    for v in values:
        key, sep, path = v.partition("=")
        if key.count(".") != 1 or not all(key.split(".")) or (sep and not path):
            raise PredictError("--data expects PARTY.DATASET=PATH (or PARTY.DATASET for the plan's own "
                               f"data), got `{v}`")
        if key in out:
            raise PredictError(f"--data {key} given twice")
        out[key] = path if sep else None
    return out


def _spec_of(plans: Mapping[str, Plan], key: str) -> DataSpec:
    party, name = key.split(".")
    for plan in plans.values():
        if plan.party == party:
            for ds in plan.data:
                if ds.name == name:
                    return ds
    known = sorted({f"{p.party}.{d.name}" for p in plans.values() for d in p.data})
    raise PredictError(f"--data {key}: no data set `{name}` of party `{party}` in this build "
                       f"(known: {', '.join(known) or 'none'})")


def read_table(spec: DataSpec, path: str | None) -> Any:
    """The rows of ``spec`` (its own file or generator), or of the csv file ``path`` with the same columns.
    New rows need not carry the label: a missing label column is not an error here."""
    from fldsl.runtime.data import DataError, load_dataset

    if path is not None:
        if spec.reader not in FILE_READERS:
            raise PredictError(f"data set `{spec.name}` is generated ({spec.reader}), not read from a file: "
                               f"give it without =PATH to score its generated rows")
        spec = spec.model_copy(update={"path": path})
    spec = prediction_spec(spec)
    try:
        return load_dataset(spec)
    except DataError as e:
        raise PredictError(str(e)) from None


def prediction_spec(spec: DataSpec) -> DataSpec:
    """``spec`` as rows to score are read: without the label where the file has no label column, and
    without the schema's row bound."""
    if spec.reader == "csv" and spec.label_column:
        header = _header(Path(spec.path or ""))
        if header is not None and spec.label_column not in header:
            fields = {k: v for k, v in spec.fields.items() if k != "label"}
            spec = spec.model_copy(update={"label_column": None, "fields": fields})
    # A declared schema's `rows <= N` bounds the training file, not the rows to score; the reader still
    # checks every column the model reads, by file:line. A data set with fitted preprocessing keeps its
    # schema: its columns are read raw (missing cells, category text), for the SavedModel's raw input.
    from fldsl.runtime.preprocess import needs_fit

    keep = spec.columns if needs_fit(spec) else None
    return spec.model_copy(update={"columns": keep, "max_rows": None})


def raw_cells(table: Any, columns: Sequence[str]) -> np.ndarray:
    """The string matrix ``[rows, len(columns)]`` a SavedModel with preprocessing takes, from a table read
    raw (``Table.raw``: numbers as float64 with NaN where missing, category text with ``""`` where
    missing): a missing number is an empty cell, a number its shortest exact text (parsed back exactly)."""
    absent = [c for c in columns if c not in table.raw]
    if absent:
        raise PredictError(f"the rows have no raw column(s) {', '.join(absent)} that the model's "
                           "preprocessing reads")
    out = np.empty((len(table), len(columns)), dtype=object)
    for j, c in enumerate(columns):
        col = table.raw[c]
        if isinstance(col, np.ndarray) and col.dtype.kind == "f":
            out[:, j] = ["" if np.isnan(v) else repr(v) for v in col.tolist()]
        else:  # category text: numpy (the exact reader) or Arrow (the Arrow readers)
            out[:, j] = ["" if v is None else v for v in col.to_pylist()] if hasattr(col, "to_pylist") \
                else col.astype(str).tolist()
    return out


def _header(path: Path) -> list[str] | None:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            row = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None  # the reader reports it, by file:line
    return [h.strip() for h in row] if row else None


def _feeds(part: Part, table: Any, rows: np.ndarray, dataset: str) -> dict[str, np.ndarray]:
    feeds = {}
    for key, inp in part.inputs().items():
        if inp["source"] != "data":
            continue
        ds, _, fld = inp["ref"].partition(".")
        if ds == dataset and inp.get("raw"):  # preprocessing inside the model: raw cells in
            feeds[key] = raw_cells(table, inp["columns"])[rows]
            continue
        if ds != dataset or fld not in table.fields:
            raise PredictError(f"the model of {part.node} reads `{inp['ref']}`, which data set `{dataset}` "
                               f"does not give (fields: {', '.join(sorted(table.fields))})")
        feeds[key] = table.fields[fld][rows]
    return feeds


# ---------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    ids: list[str]
    scores: np.ndarray
    scenario: str
    nodes: list[str]


def predict(build: Path, sources: Sequence[Path], data: Sequence[str], *,
            trust_dir: Path = Path(".fldsl/trust")) -> Prediction:
    plans = load_plans(build)
    bindings = parse_bindings(data)
    roles = {p.role.split(".")[0] for p in plans.values()}
    with tempfile.TemporaryDirectory(prefix="fldsl-predict-") as tmp:
        tmp_path = Path(tmp)
        tmp_path.chmod(0o700)  # plaintext models: the owner's only
        folders = open_models(sources, plans, tmp_path, trust_dir)
        if "vertical" in roles:
            return _vertical(plans, folders, bindings)
        return _local(plans, folders, bindings, roles.pop() if len(roles) == 1 else "horizontal")


def _local(plans: Mapping[str, Plan], folders: Mapping[str, Path], bindings: Mapping[str, str | None],
           scenario: str) -> Prediction:
    exporters = [n for n, p in plans.items() if p.export and p.loss is not None]
    if len(exporters) != 1:
        raise PredictError(f"this {scenario} build has {len(exporters)} scoring models; expected one")
    node = exporters[0]
    if node not in folders:
        raise PredictError(f"no model of {node} among the --model folders "
                           f"(have: {', '.join(folders) or 'none'})")
    parts = load_parts({node: folders[node]}, plans)
    if len(bindings) != 1:
        known = sorted({f"{p.party}.{d.name}" for p in plans.values() for d in p.data})
        raise PredictError(f"a {scenario} model scores one data set: give one --data PARTY.DATASET[=PATH] "
                           f"(one of: {', '.join(known)})")
    key, path = next(iter(bindings.items()))
    spec = _spec_of(plans, key)
    table = read_table(spec, path)
    rows = np.arange(len(table), dtype=np.int64)
    out = parts[node](_feeds(parts[node], table, rows, spec.name))
    return Prediction([str(i) for i in table.ids.tolist()], out["scores"], scenario, [node])


def _vertical(plans: Mapping[str, Plan], folders: Mapping[str, Path],
              bindings: Mapping[str, str | None]) -> Prediction:
    active = [n for n, p in plans.items() if p.role == "vertical.active"]
    if len(active) != 1:
        raise PredictError(f"a vertical build needs one label owner, this one has {len(active)}")
    order = [active[0], *(n for n, p in plans.items() if p.role == "vertical.passive")]
    missing = [n for n in order if n not in folders]
    if missing:
        raise PredictError(f"vertical prediction needs every part: no model of {', '.join(missing)} among "
                           f"the --model folders (have: {', '.join(folders) or 'none'})")
    used = set()
    tables: dict[str, tuple[str, Any]] = {}
    for n in order:
        plan = plans[n]
        if len(plan.data) != 1:
            raise PredictError(f"{n}: vertical prediction expects one data set per node, the plan has "
                               f"{len(plan.data)}")
        ds = plan.data[0]
        key = f"{plan.party}.{ds.name}"
        used.add(key)
        tables[n] = (ds.name, read_table(ds, bindings.get(key)))
    extra = sorted(set(bindings) - used)
    if extra:
        raise PredictError(f"--data {extra[0]}: not a data set of this build's nodes "
                           f"(they read: {', '.join(sorted(used))})")
    parts = load_parts({n: folders[n] for n in order}, plans)
    # The ids every part has, in the label owner's order: what PSI would align, computed in the clear here
    # because one owner holds every file on this path.
    lead_ids = [str(i) for i in tables[order[0]][1].ids.tolist()]
    positions = {n: {str(i): r for r, i in enumerate(tables[n][1].ids.tolist())} for n in order}
    ids = [i for i in lead_ids if all(i in positions[n] for n in order[1:])]
    if not ids:
        raise PredictError("the parties' files have no id in common: nothing to score")
    feeds: dict[str, np.ndarray] = {}
    for n in order[1:]:
        rows = np.array([positions[n][i] for i in ids], dtype=np.int64)
        feeds.update(parts[n](_feeds(parts[n], tables[n][1], rows, tables[n][0])))
    lead = parts[order[0]]
    rows = np.array([positions[order[0]][i] for i in ids], dtype=np.int64)
    own = _feeds(lead, tables[order[0]][1], rows, tables[order[0]][0])
    for key, inp in lead.inputs().items():
        if inp["source"] != "data":
            if inp["ref"] not in feeds:
                raise PredictError(f"the label owner's model reads `{inp['ref']}` from {inp['source']}, "
                                   "whose model does not output it")
            own[key] = feeds[inp["ref"]]
    return Prediction(ids, lead(own)["scores"], "vertical", order)


def write_scores(pred: Prediction, out: Path | None) -> str:
    text = sm.scores_csv(pred.ids, pred.scores)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------
# vertical, split over the attested channel: one node process per party, as `fldsl run` starts them
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SplitRun:
    """A split prediction: where the label owner wrote ``id,score``, how many rows, and the node run."""

    scores: Path
    rows: int
    nodes: list[str]
    run_dir: Path
    result: Any  # fldsl.runtime.launcher.RunResult


def node_models(sources: Sequence[Path], plans: Mapping[str, Plan]) -> dict[str, Path]:
    """{node: what its ``--predict`` gets}: the folder among ``sources`` whose card is that node's (``fldsl
    model decrypt`` output), else its sealed pack in a run folder among ``sources`` (the node opens it with
    its own sealing key)."""
    found: dict[str, Path] = {}
    runs: list[Path] = []
    for src in sources:
        if (src / sm.CARD_FILE).is_file():
            node = str(_card(src).get("node"))
            if node in found:
                raise PredictError(f"{src}: a second model of {node} (the first: {found[node]})")
            found[node] = src
        elif (src / "models").is_dir():
            runs.append(src)
        else:
            raise PredictError(f"{src}: neither a decrypted model folder (no {sm.CARD_FILE}) nor a run "
                               f"folder with models/*{sm.SUFFIX}.sealed")
    unknown = sorted(set(found) - set(plans))
    if unknown:
        raise PredictError(f"the model of {unknown[0]}, which is not a node of this build "
                           f"(nodes: {', '.join(plans)})")
    for node, plan in plans.items():
        if node in found or plan.export is None:
            continue
        name = f"{plan.export.replace('/', '_')}{sm.SUFFIX}.sealed"
        packs = [r / "models" / name for r in runs if (r / "models" / name).is_file()]
        if len(packs) > 1:
            raise PredictError(f"two models of {node}: {packs[0]} and {packs[1]}")
        if packs:
            found[node] = packs[0]
    missing = [n for n in plans if n not in found]
    if missing:
        raise PredictError(f"split prediction needs every node's model: none of {', '.join(missing)} among "
                           f"the --model folders ({', '.join(map(str, sources))})")
    return found


def predict_split(build: Path, sources: Sequence[Path], data: Sequence[str], *, out: Path | None,
                  trust_dir: Path = Path(".fldsl/trust"), runs_root: Path = Path("runs"),
                  run_dir: Path | None = None, display: Any = None) -> SplitRun:
    """Vertical prediction split over the attested channel (``fldsl.runtime.roles.predict``): every node of
    the build as its own process on this machine, each with its own model (:func:`node_models`) and data
    (``--data PARTY.DATASET=PATH`` goes to the node of that party), exactly as ``fldsl run`` starts them,
    in ``run_dir`` (default ``runs_root/<pipeline>/predict/<time>/``); the label owner writes ``id,score``
    to ``out`` (default ``<run dir>/scores.csv``). Nodes' failures
    come back as a :class:`PredictError` with the run's exit code (2 input, 3 trust, 1 other)."""
    from fldsl.runtime import launcher as L

    plans = load_plans(build)
    roles = {p.role for p in plans.values()}
    if not roles <= {"vertical.active", "vertical.passive"} or "vertical.active" not in roles:
        raise PredictError("the split path is for vertical pipelines (one label owner, passive parties); "
                           "horizontal and distributed models score locally")
    models = node_models(sources, plans)
    node_args: dict[str, list[str]] = {n: ["--predict", str(models[n].resolve())] for n in plans}
    for key, path in parse_bindings(data).items():
        spec = _spec_of(plans, key)
        party = key.split(".")[0]
        node = next(n for n, p in plans.items() if p.party == party and spec in p.data)
        if path is not None:
            if spec.reader not in FILE_READERS:
                raise PredictError(f"data set `{spec.name}` is generated ({spec.reader}), not read from a "
                                   "file: give it without =PATH to score its generated rows")
            if not Path(path).is_file():
                raise PredictError(f"--data {key}: {path}: no such file")
            node_args[node] += ["--data", f"{spec.name}={Path(path).resolve()}"]
    try:
        ids = L.node_ids(build)
        if run_dir is None:
            run_dir = L.new_run_dir(runs_root / L.pipeline_name(build, ids), "predict")
    except L.LaunchError as e:
        raise PredictError(str(e), e.exit_code) from None
    target = (out if out is not None else run_dir / "scores.csv").resolve()
    active = next(n for n, p in plans.items() if p.role == "vertical.active")
    node_args[active] += ["--predict-out", str(target)]
    try:
        result = L.run_pipeline(build, run_dir=run_dir, trust_dir=trust_dir, display=display,
                                node_args=node_args)
    except L.LaunchError as e:
        raise PredictError(str(e), e.exit_code) from None
    if result.exit_code != 0:
        failed = [st for st in result.nodes.values() if st.exit_code not in (0, None)]
        first = next((st for st in failed if st.exit_code == result.exit_code), None) or \
            (failed[0] if failed else None)
        why = f"{first.id}: {first.error}" if first is not None else "interrupted"
        raise PredictError(f"split prediction failed: {why} (logs: {run_dir / 'logs'})", result.exit_code)
    done = result.nodes[active].done or {}
    rows = int((done.get("predicted") or {}).get("rows", 0))
    return SplitRun(target, rows, [active, *(n for n in plans if n != active)], run_dir, result)
