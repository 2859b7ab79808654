"""Preprocessing in schema blocks (issue #12): raw csv files with empty cells, a missing-value token, string
categories, unscaled columns and three classes go straight into a vertical pipeline, which fills, scales and
one-hot encodes at the party holding each column, fitted on the training rows only, and reaches a central
multinomial logistic regression trained on the same split after preprocessing the same files centrally.
The roles run in this process over in-memory links."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import memlink

from fldsl.api import compile_pipeline
from fldsl.runtime.csvschema import SchemaMismatch
from fldsl.runtime.data import stratified_split

ROWS = 1500
EDUCATION = ["HS-grad", "Bachelors", "Masters", "Doctorate", "Some-college", "Assoc", "Prof-school", "11th"]
REGIONS = [f"region-{k:02d}" for k in range(24)]

PIPELINE = """\
pipeline census
use std.models.{mlp, dense, concat}
party bank {
  node n
  data people = csv("data/bank.csv", id: id, label: segment) {
    rows <= 2000
    numeric  age                      missing: "?" mean indicator  scale: standard
    numeric  "capital-gain"           missing: median              scale: minmax
    category education                missing: "?"                 vocabulary: top 10
  }
}
party shop {
  node n
  data baskets = csv("data/shop.csv", id: id) {
    rows <= 2000
    numeric  spend                    missing: constant 0 indicator  scale: standard
    integer  visits                   scale: clip(0, 20)
    category region                   hash: 128 buckets
  }
}
partition vertical { align bank.people, shop.baskets on id using psi.ecdh }
model {
  at shop: a = mlp(baskets.features, units: [16])
  at bank: logits = dense(concat(mlp(people.features, units: [16]), a), units: [16, 3])
  loss softmax_cross_entropy(logits, people.label)
}
train {
  epochs: 8  batch_size: 64  validation: 0.25  seed: 5  metrics: [loss, accuracy]
  optimizer: adam(learning_rate: 0.005)
}
trust { allow shop -> bank: a  allow bank -> shop: grad(a) }
"""


def _write_data(d: Path, rows: int = ROWS) -> dict[str, np.ndarray]:
    """Two parties' raw files with a known signal over three classes. Bank: age (empty cells and `?`),
    capital-gain (tens of thousands, some empty), education (text, `?` for unknown). Shop: spend (empty
    cells), visits (whole numbers, a few far out), region (24 text values). The class is the argmax of a
    linear score of all of them plus noise."""
    rng = np.random.default_rng(12)
    age = rng.normal(45, 12, rows)
    gain = rng.exponential(8000, rows)
    edu = rng.integers(0, len(EDUCATION), rows)
    spend = rng.normal(300, 90, rows)
    visits = rng.poisson(4, rows)
    visits[rng.random(rows) < 0.02] = 90  # outliers that clip(0, 20) tames
    region = rng.integers(0, len(REGIONS), rows)
    w_edu = rng.normal(0, 1.2, (len(EDUCATION), 3))
    w_reg = rng.normal(0, 1.0, (len(REGIONS), 3))
    score = (np.outer((age - 45) / 12, [1.2, 0.0, -1.2]) + np.outer((gain - 8000) / 8000, [-0.8, 0.9, 0.0])
             + w_edu[edu] + np.outer((spend - 300) / 90, [0.0, -1.1, 1.1])
             + np.outer(np.minimum(visits, 20) / 4 - 1, [0.5, 0.0, -0.5]) + w_reg[region])
    y = np.argmax(score + rng.gumbel(0, 0.6, score.shape), axis=1)

    def cell(x: float, p_empty: float, token: str | None = None) -> str:
        r = rng.random()
        if r < p_empty:
            return ""
        if token is not None and r < 2 * p_empty:
            return token
        return f"{x:.2f}"

    d.mkdir()
    bank = ["id,segment,age,capital-gain,education,notes"]
    shop = ["id,spend,visits,region"]
    for i in range(rows):
        e = "?" if rng.random() < 0.05 else EDUCATION[edu[i]]
        bank.append(f"u{i},{y[i]},{cell(age[i], 0.05, '?')},{cell(gain[i], 0.04)},{e},free text {i % 7}")
        shop.append(f"u{i},{cell(spend[i], 0.06)},{visits[i]},{REGIONS[region[i]]}")
    (d / "bank.csv").write_text("\n".join(bank) + "\n")
    (d / "shop.csv").write_text("\n".join(shop) + "\n")
    return {"y": y}


# ---------------------------------------------------------------------------------------------------------
# The central baseline: its own preprocessing of the raw files (sklearn's SimpleImputer + StandardScaler /
# MinMaxScaler + OneHotEncoder(handle_unknown="ignore"), written out), then multinomial logistic regression
# fitted to convergence by full-batch gradient descent (sklearn is not installed here).
# ---------------------------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, list[str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cols = list(zip(*(ln.split(",") for ln in lines[1:]), strict=True))
    return {h: list(c) for h, c in zip(header, cols, strict=True)}


def _central_features(bank: dict[str, list[str]], shop: dict[str, list[str]], train: np.ndarray
                      ) -> np.ndarray:
    blocks: list[np.ndarray] = []

    def number(cells: list[str], fill: str, scale: str, indicator: bool, token: str | None = None) -> None:
        miss = np.array([c.strip() in ("", token) for c in cells])
        x = np.array([np.nan if m else float(c) for c, m in zip(cells, miss, strict=True)])
        seen = x[train][~np.isnan(x[train])]
        v = {"mean": np.mean(seen) if seen.size else 0.0, "median": np.median(seen) if seen.size else 0.0,
             "zero": 0.0}[fill]
        x = np.where(miss, v, x)
        if scale == "standard":
            x = (x - x[train].mean()) / (x[train].std() or 1.0)
        elif scale == "minmax":
            x = (x - x[train].min()) / ((x[train].max() - x[train].min()) or 1.0)
        else:
            x = np.clip(x, 0, 20)
        blocks.append(x[:, None])
        if indicator:
            blocks.append(miss[:, None].astype(float))

    def onehot(cells: list[str], token: str | None = None) -> None:
        vals = np.array(["" if c.strip() in ("", token) else c.strip() for c in cells])
        cats = sorted(set(vals[train].tolist()))
        blocks.append((vals[:, None] == np.array(cats)[None, :]).astype(float))

    number(bank["age"], "mean", "standard", True, "?")
    number(bank["capital-gain"], "median", "minmax", False)
    onehot(bank["education"], "?")
    number(shop["spend"], "zero", "standard", True)
    number(shop["visits"], "zero", "clip", False)
    onehot(shop["region"])
    return np.concatenate(blocks, axis=1)


def _logistic_regression_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    k = int(y.max()) + 1
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = np.zeros((xb.shape[1], k))
    onehot = np.eye(k)[y[train]]
    for _ in range(3000):
        z = xb[train] @ w
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w -= 0.5 * (xb[train].T @ (p - onehot) / len(train) + 1e-4 * w)
    return float(np.mean(np.argmax(xb[test] @ w, axis=1) == y[test]))


def _model_members(run_dir: Path, node: str) -> dict[str, np.ndarray]:
    from fldsl.runtime import sealing

    name = f"{node}/model"
    data = sealing.unseal_file(run_dir / "models" / f"{name.replace('/', '_')}.sealed", key=memlink.KEY,
                               node_id=node, name=name)
    with np.load(io.BytesIO(data)) as npz:
        return {k: npz[k] for k in npz.files}


def _sealed_fit(run_dir: Path, node: str) -> dict:
    """What a node that exports no model (a horizontal worker) sealed: its fitted preprocessing."""
    from fldsl.runtime import sealing

    name = f"{node}/preprocessing"
    data = sealing.unseal_file(run_dir / "models" / f"{name.replace('/', '_')}.sealed", key=memlink.KEY,
                               node_id=node, name=name)
    return json.loads(data)


def test_vertical_pipeline_preprocesses_raw_files_and_reaches_the_central_baseline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    truth = _write_data(tmp_path / "data")
    flp = tmp_path / "census.flp"
    flp.write_text(PIPELINE)
    build = compile_pipeline(flp, tmp_path / "build").build_dir
    plan = json.loads((build / "nodes/bank.n/plan.json").read_text())
    # age: value + indicator, capital-gain: 1, education: top 10 + other = 11 -> 14 (known when compiling)
    assert plan["data"][0]["fields"]["features"]["shape"] == [None, 14]
    shop_plan = json.loads((build / "nodes/shop.n/plan.json").read_text())
    assert shop_plan["data"][0]["fields"]["features"]["shape"] == [None, 2 + 1 + 128]

    res = memlink.run_in_threads(build, tmp_path / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    fed = res["bank.n"]["metrics"]["accuracy"]

    bank, shop = _read(tmp_path / "data/bank.csv"), _read(tmp_path / "data/shop.csv")
    ids = np.array(bank["id"])
    y = np.array([int(v) for v in bank["segment"]])
    assert (y == truth["y"]).all() and set(y.tolist()) == {0, 1, 2}
    train_ids, test_ids = stratified_split(ids, y, 0.25, 5)
    pos = {v: i for i, v in enumerate(ids.tolist())}
    train = np.array([pos[v] for v in train_ids.tolist()])
    test = np.array([pos[v] for v in test_ids.tolist()])
    central = _logistic_regression_accuracy(_central_features(bank, shop, train), y, train, test)
    assert central > 0.6, central  # the signal is there to be learnt (chance is 1/3)
    print(f"federated holdout accuracy {fed:.3f}, central logistic regression {central:.3f}")
    assert fed >= central - 0.02, (fed, central, res["bank.n"]["history"])

    # Each party's exported model carries what it fitted, on the training rows only.
    pre = json.loads(_model_members(tmp_path / "run", "bank.n")["preprocessing"].tobytes())["people"]
    age = next(c for c in pre["columns"] if c["name"] == "age")
    cells = np.array(bank["age"])
    seen = np.array([c not in ("", "?") for c in cells])
    x = np.array([float(c) if s else np.nan for c, s in zip(cells, seen, strict=True)])
    assert pre["train_rows"] == len(train)
    assert age["missing"]["value"] == pytest.approx(np.nanmean(x[train]), rel=1e-12)
    assert age["missing"]["value"] != pytest.approx(np.nanmean(x), rel=1e-9)  # not all rows
    edu = next(c for c in pre["columns"] if c["name"] == "education")
    assert len(edu["vocabulary"]) == 9 and edu["other_column"] == 10 and edu["columns"] == [3, 14]
    shop_pre = json.loads(_model_members(tmp_path / "run", "shop.n")["preprocessing"].tobytes())["baskets"]
    assert [c["name"] for c in shop_pre["columns"]] == ["spend", "visits", "region"]
    assert shop_pre["columns"][2]["hash_buckets"] == 128 and "vocabulary" not in shop_pre["columns"][2]


def test_without_missing_option_empty_cells_are_errors_with_a_suggestion(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write_data(tmp_path / "data", rows=200)
    flp = tmp_path / "census.flp"
    flp.write_text(PIPELINE.replace('missing: "?" mean indicator', "").replace("missing: median", ""))
    build = compile_pipeline(flp, tmp_path / "build").build_dir
    res = memlink.run_in_threads(build, tmp_path / "run", timeout=60)
    err = res["bank.n"]
    assert isinstance(err, SchemaMismatch), repr(err)
    assert len(err.problems) == 2
    age, gain = err.problems
    assert age.startswith("data/bank.csv:") and "column `age` (numeric): " in age
    assert "declare `missing: mean`" in age or "declare `missing: \"?\" mean`" in age
    assert "column `capital-gain` (numeric): empty value" in gain
    assert "to fill empty cells, declare `missing: mean` (or `median`, `constant N`) on its line" in gain


BLOCK = """{
    rows <= 400
    numeric  spend   missing: mean indicator  scale: standard
    category region  missing: "?"  hash: 16 buckets
  }"""


def _bank_file(path: Path, seed: int, shift: float, rows: int = 240) -> None:
    rng = np.random.default_rng(seed)
    spend = rng.normal(100 + shift, 20, rows)
    region = rng.integers(0, 6, rows)
    y = ((spend - 100 - shift) / 20 + (region % 2) * 1.5 + rng.normal(0, 0.5, rows) > 0.75).astype(int)
    cash = ["" if i % 9 == 0 else f"{spend[i]:.2f}" for i in range(rows)]
    place = ["?" if i % 11 == 0 else f"r{region[i]}" for i in range(rows)]
    lines = ["id,y,spend,region"] + [f"{path.stem}-{i},{y[i]},{cash[i]},{place[i]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def _spend_mean(path: Path, train_ids: set[str]) -> float:
    rows = [ln.split(",") for ln in path.read_text().splitlines()[1:]]
    return float(np.mean([float(r[2]) for r in rows if r[0] in train_ids and r[2]]))


def _horizontal_source(trust: str, block: str = BLOCK) -> str:
    return f"""pipeline h
use std.models.{{mlp, dense}}
party bank[1..2] {{
  node worker
  data people = csv("data/bank{{i}}.csv", id: id, label: y) {block}
}}
party hub {{ node ps }}
partition horizontal over bank aggregate at hub.ps every epoch with fedavg
model {{
  logits = dense(mlp(people.features, units: [8]), units: [8, 2])
  loss softmax_cross_entropy(logits, people.label)
}}
train {{
  epochs: 6  batch_size: 32  validation: 0.25  seed: 2  metrics: [loss, auc]
  optimizer: adam(learning_rate: 0.01)
}}
trust {{ {trust} }}
"""


POOLING = ("allow bank -> hub.ps: weights  allow hub.ps -> bank: weights\n"
           "  allow bank -> hub.ps: stats  allow hub.ps -> bank: stats")


def _train_rows(path: Path) -> tuple[set[str], list[list[str]]]:
    rows = [r.split(",") for r in path.read_text().splitlines()[1:]]
    ids = np.array([r[0] for r in rows])
    train_ids, _ = stratified_split(ids, np.array([int(r[1]) for r in rows]), 0.25, 2)
    return set(train_ids.tolist()), rows


def test_horizontal_workers_pool_statistics_and_fit_what_central_training_fits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Horizontal: the workers send the statistics of their training columns (counts, means, spreads; the
    declared `stats` flow) to the aggregator and fit on its merge: every worker's fill value and scale
    are those of all the workers' training rows together, as central training would fit them, although
    the two banks' populations differ."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _bank_file(tmp_path / "data/bank1.csv", 1, 0.0)
    _bank_file(tmp_path / "data/bank2.csv", 2, 50.0)  # another population: another mean
    (tmp_path / "h.flp").write_text(_horizontal_source(POOLING))
    build = compile_pipeline(tmp_path / "h.flp", tmp_path / "build").build_dir
    policy = json.loads((build / "nodes" / "hub.ps" / "policy.json").read_text())
    stats = [f for f in policy["flows"] if f["kind"] == "stats"]
    assert len(stats) == 4 and all(f["spec"]["shape"] == [1, 6] for f in stats)  # one pooled column: spend
    res = memlink.run_in_threads(build, tmp_path / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    spend: list[float] = []
    for k in (1, 2):
        train, rows = _train_rows(tmp_path / f"data/bank{k}.csv")
        spend += [float(r[2]) for r in rows if r[0] in train and r[2]]
        missing = sum(1 for r in rows if r[0] in train and not r[2])
        spend += [float("nan")] * missing
    x = np.array(spend)
    mean = float(np.nanmean(x))
    filled = np.where(np.isnan(x), mean, x)
    for k in (1, 2):
        node = f"bank{k}.worker"
        assert res[node]["metrics"]["auc"] > 0.75, res[node]["history"]
        pre = _sealed_fit(tmp_path / "run", node)["people"]
        col = pre["columns"][0]
        assert col["missing"]["value"] == pytest.approx(mean, rel=1e-12)
        assert col["scale"]["offset"] == pytest.approx(float(filled.mean()), rel=1e-12)
        assert col["scale"]["divisor"] == pytest.approx(float(filled.std()), rel=1e-12)
        assert pre["width"] == 2 + 16
        assert pre["train_rows"] == len(_train_rows(tmp_path / f"data/bank{k}.csv")[0])
    assert _sealed_fit(tmp_path / "run", "bank1.worker")["people"]["columns"][0] == \
        _sealed_fit(tmp_path / "run", "bank2.worker")["people"]["columns"][0]


def test_horizontal_pooling_needs_an_allow_rule_and_refuses_a_median(tmp_path: Path) -> None:
    """The pooled statistics are derived from each bank's columns: without `allow ... : stats` the check
    names the flow and the rule to add; a median fill cannot be pooled and is refused where declared."""
    from fldsl.api import check
    from fldsl.diagnostics import FldslError

    p = tmp_path / "h.flp"
    p.write_text(_horizontal_source("allow bank -> hub.ps: weights  allow hub.ps -> bank: weights"))
    with pytest.raises(FldslError) as e:
        check(p, {})
    text = str(e.value) + "".join(d.message + (d.hint or "") for d in e.value.diagnostics)
    assert "`stats` would carry `bank1.people columns` to `hub`" in text
    assert "add `allow bank -> hub: stats` to the trust block" in text
    p.write_text(_horizontal_source(POOLING, BLOCK.replace("missing: mean", "missing: median")))
    with pytest.raises(FldslError) as e:
        check(p, {})
    median = [d for d in e.value.diagnostics if "`median` is not available" in d.message]
    assert len(median) == 1 and median[0].line == 7 and median[0].hint == "use `mean` or `constant N`"
    assert p.read_text().splitlines()[6][median[0].column - 1:].startswith("median")


def test_distributed_chief_fits_on_the_rows_its_workers_train_on(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Distributed: the chief holds the data, fits on the union of the workers' training rows (each shard
    less the holdout its worker splits off), shards transformed features, and the workers export the fit."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _bank_file(tmp_path / "data/owner.csv", 3, 10.0, rows=300)
    src = f"""pipeline d
use std.models.{{mlp, dense}}
party owner {{
  node chief
  data people = csv("data/owner.csv", id: id, label: y) {BLOCK}
}}
party cloud {{ node ps  node worker[1..2] }}
partition distributed from owner.chief to cloud.worker via cloud.ps shard round_robin
model {{
  logits = dense(mlp(people.features, units: [8]), units: [8, 2])
  loss softmax_cross_entropy(logits, people.label)
}}
train {{
  epochs: 6  batch_size: 32  validation: 0.25  seed: 2  metrics: [loss, auc]
  optimizer: adam(learning_rate: 0.01)
}}
trust {{
  allow owner -> cloud.worker: shard
  allow cloud.worker -> cloud.ps: gradients
  allow cloud.ps -> cloud.worker: weights
}}
"""
    (tmp_path / "d.flp").write_text(src)
    build = compile_pipeline(tmp_path / "d.flp", tmp_path / "build").build_dir
    res = memlink.run_in_threads(build, tmp_path / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    rows = (tmp_path / "data/owner.csv").read_text().splitlines()[1:]
    ids = np.array([r.split(",")[0] for r in rows])
    y = np.array([int(r.split(",")[1]) for r in rows])
    train: set[str] = set()
    for k in range(2):
        shard = np.arange(k, len(ids), 2)
        tr, _ = stratified_split(ids[shard], y[shard], 0.25, 2)
        train |= set(tr.tolist())
    want = _spend_mean(tmp_path / "data/owner.csv", train)
    for node in ("cloud.worker1", "cloud.worker2"):
        assert res[node]["metrics"]["auc"] > 0.75, res[node]["history"]
        pre = _sealed_fit(tmp_path / "run", node)["people"]
        assert pre["columns"][0]["missing"]["value"] == pytest.approx(want, rel=1e-12)
        assert pre["train_rows"] == len(train)


@pytest.mark.parametrize(("row", "why"), [
    ([-1, 0, 0, 0, 0, 0], "negative count"),
    ([2.5, 0, 0, 0, 0, 0], "fractional count"),
    ([3, 1, -0.5, 0, 1, 0], "negative spread"),
    ([3, 1, 0.5, 2, 1, 0], "min above max"),
    ([3, float("nan"), 0.5, 0, 1, 0], "not finite"),
    ([3, 1, 0.5, 0, 1, float("inf")], "infinite missing count"),
])
def test_pooled_statistics_that_are_not_statistics_are_refused(row: list[float], why: str) -> None:
    """What the aggregator (or a worker) does with a `stats` message whose shape the flow guard passed but
    whose values cannot be statistics: refuse the sender (exit 3, a policy violation), naming it."""
    from types import SimpleNamespace

    from fldsl.artifacts import Flow, TensorSpec
    from fldsl.runtime.roles import hsummary
    from fldsl.runtime.roles.common import PeerLimitExceeded

    flow = Flow(id="bank1.worker->hub.ps:stats", tensor="stats", kind="stats", src="bank1.worker",
                dst="hub.ps", spec=TensorSpec(shape=[1, 6], dtype="float64"), max_bytes=10_000, rule="test")
    good = np.array([[3, 1, 0.5, 0, 2, 1]], dtype=np.float64)
    sent = {"x": good}
    link = SimpleNamespace(recv=lambda flow_id, key, timeout: sent["x"])
    ctx = SimpleNamespace(links={"bank1.worker": link}, wait=lambda fn, peer: fn(1.0))
    np.testing.assert_array_equal(hsummary.recv_stats(ctx, flow), good)  # type: ignore[arg-type]
    sent["x"] = np.array([row], dtype=np.float64)
    with pytest.raises(PeerLimitExceeded) as e:
        hsummary.recv_stats(ctx, flow)  # type: ignore[arg-type]
    assert e.value.peer == "bank1.worker" and "not statistics" in str(e.value), why
