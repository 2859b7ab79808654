"""SavedModel exports and `fldsl predict` (issue #12 item 5): the packs a run writes, what `fldsl model
decrypt` makes of them, plain `tf.saved_model.load`, and predicted scores equal to the training run's own
holdout scores, id for id."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fldsl.artifacts import Plan, dump_json, load_model, node_dir
from fldsl.cli import EXIT_INPUT, EXIT_OK, EXIT_TRUST, main
from fldsl.runtime import owner_export as ox
from fldsl.runtime import savedmodel as sm
from fldsl.runtime import sealing

sys.path.insert(0, str(Path(__file__).parent))
import buildkit
import memlink

SHOP, MEDIA = "shop.trainer", "media.trainer"


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _read_scores(text: str) -> dict[str, float]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["id", "score"]
    return {r[0]: float(r[1]) for r in rows[1:]}


def _trust_dir(root: Path) -> Path:
    """Each party's sealing key where `fldsl predict --trust-dir` looks (the threads sealed with KEY)."""
    for party in ("shop", "media", "hub"):
        (root / "trust" / party).mkdir(parents=True, exist_ok=True)
        (root / "trust" / party / "sealing.key").write_bytes(memlink.KEY)
    return root / "trust"


@pytest.fixture(scope="module")
def vertical(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A vertical run: shop (labels, a csv) and media (generated features); shop's exports also encrypted
    to an owner key."""
    root = tmp_path_factory.mktemp("vertical")
    assert cli("trust", "owner-key", str(root / "owner.pem")).exit_code == EXIT_OK
    build = buildkit.vertical_csv_build(root, {}, rows=200)
    plan_path = node_dir(build, SHOP) / "plan.json"
    plan = load_model(Plan, plan_path)
    plan.export_recipient = ox.public_key_pem((root / "owner.pub.pem").read_bytes())
    plan_path.write_text(dump_json(plan))
    res = memlink.run_in_threads(build, root / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    return {"root": root, "build": build, "run": root / "run", "trust": _trust_dir(root),
            "csv": root / "data" / "conversions.csv"}


def _holdout(v: dict[str, Path]) -> dict[str, float]:
    data = sealing.unseal_file(v["run"] / "models" / f"{SHOP}_model{sm.SUFFIX}.sealed", key=memlink.KEY,
                               node_id=SHOP, name=sm.export_name(f"{SHOP}/model"))
    folder = v["root"] / "holdout-pack"
    if not folder.exists():
        sm.unpack(data, folder)
    return _read_scores((folder / sm.HOLDOUT_FILE).read_text())


def test_the_run_exports_savedmodel_packs_with_cards(vertical: dict[str, Path]) -> None:
    models = vertical["run"] / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted([
        f"{MEDIA}_model.sealed", f"{MEDIA}_model.savedmodel.sealed", f"{SHOP}_model.owner",
        f"{SHOP}_model.sealed", f"{SHOP}_model.savedmodel.owner", f"{SHOP}_model.savedmodel.sealed"])
    pack = sealing.unseal_file(models / f"{SHOP}_model.savedmodel.sealed", key=memlink.KEY, node_id=SHOP,
                               name=f"{SHOP}/model/savedmodel")
    shop = sm.unpack(pack, vertical["root"] / "c1")
    assert shop["signature"]["inputs"]["conversions_features"]["columns"] == [f"f{i}" for i in range(8)]
    assert shop["signature"]["inputs"]["act1"]["source"] == MEDIA
    assert set(shop["signature"]["outputs"]) == {"scores", "logits"}
    assert shop["parts"] == {SHOP: ["s_bottom", "joined", "logits"], MEDIA: ["act1"]}
    holdout = _holdout(vertical)
    assert "auc" in shop["metrics"] and shop["history"][-1]["auc"] == shop["metrics"]["auc"]
    assert shop["holdout_scores"] == {"file": "holdout_scores.csv", "rows": len(holdout)} and holdout
    plan = load_model(Plan, node_dir(vertical["build"], SHOP) / "plan.json")
    assert shop["plan_digest"] == sm.plan_digest(plan)
    # The weights file keeps its name and the pack its own: one cannot be unsealed as the other.
    with pytest.raises(sealing.SealError):
        sealing.unseal_file(models / f"{SHOP}_model.savedmodel.sealed", key=memlink.KEY, node_id=SHOP,
                            name=f"{SHOP}/model")


def test_vertical_predict_equals_the_runs_holdout_scores(vertical: dict[str, Path]) -> None:
    out = vertical["root"] / "scores.csv"
    res = cli("predict", "--local", str(vertical["build"]), "--model", str(vertical["run"]),
              "--trust-dir", str(vertical["trust"]), "-o", str(out))
    assert res.exit_code == EXIT_OK, res.output + res.stderr
    got, want = _read_scores(out.read_text()), _holdout(vertical)
    assert f"scored {len(got)} rows" in res.stderr and "owner-side" in res.stderr
    assert want and set(want) <= set(got) and len(got) > len(want)
    for i, score in want.items():
        assert got[i] == pytest.approx(score, rel=1e-5, abs=1e-6), i


def test_new_rows_by_column_name_without_labels(vertical: dict[str, Path]) -> None:
    """A file of new rows: the label owner's columns in another order, no label column, only the holdout
    ids; the scores are the run's."""
    want = _holdout(vertical)
    rows = list(csv.DictReader(vertical["csv"].open()))
    cols = [f"f{i}" for i in reversed(range(8))]
    new = vertical["root"] / "new.csv"
    with new.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*cols, "example_id"])
        for r in rows:
            if r["example_id"] in want:
                w.writerow([*(r[c] for c in cols), r["example_id"]])
    res = cli("predict", "--local", str(vertical["build"]), "--model", str(vertical["run"]), "--trust-dir",
              str(vertical["trust"]), "--data", f"shop.conversions={new}")
    assert res.exit_code == EXIT_OK, res.output + res.stderr
    got = _read_scores(res.stdout)
    assert set(got) == set(want)
    for i, score in want.items():
        assert got[i] == pytest.approx(score, rel=1e-5, abs=1e-6), i


def test_decrypted_savedmodels_load_with_plain_tensorflow(vertical: dict[str, Path]) -> None:
    import tensorflow as tf

    from fldsl.runtime.datagen import wide_n_deep

    root, models = vertical["root"], vertical["run"] / "models"
    res = cli("model", "decrypt", str(models / f"{SHOP}_model.savedmodel.owner"), "--owner-key",
              str(root / "owner.pem"), "-o", str(root / "owner") + "/")
    assert res.exit_code == EXIT_OK, res.output
    shop_dir = root / "owner" / f"{SHOP}_model.savedmodel"
    res = cli("model", "decrypt", str(models / f"{MEDIA}_model.savedmodel.sealed"), "--node", MEDIA,
              "--name", f"{MEDIA}/model/savedmodel", "--key-file",
              str(vertical["trust"] / "media" / "sealing.key"), "-o", str(root / "media-model"))
    assert res.exit_code == EXIT_OK, res.output
    media_dir = root / "media-model"
    assert (shop_dir / "saved_model.pb").is_file() and (media_dir / "model_card.json").is_file()

    want = _holdout(vertical)
    ids = list(want)
    media = wide_n_deep(200, 7, "follower", 8)
    pos = {str(i): k for k, i in enumerate(media.ids.tolist())}
    sparse = media.fields["sparse"][[pos[i] for i in ids]]
    shop_rows = {r["example_id"]: r for r in csv.DictReader(vertical["csv"].open())}
    features = np.array([[float(shop_rows[i][f"f{k}"]) for k in range(8)] for i in ids], dtype=np.float32)

    media_fn = tf.saved_model.load(str(media_dir)).signatures["serving_default"]
    act1 = media_fn(impressions_sparse=tf.constant(sparse, tf.int64))["act1"]
    shop_fn = tf.saved_model.load(str(shop_dir)).signatures["serving_default"]
    scores = shop_fn(conversions_features=tf.constant(features), act1=act1)["scores"].numpy()
    np.testing.assert_allclose(scores, [want[i] for i in ids], rtol=1e-5, atol=1e-6)

    # The decrypted folders are what `fldsl predict --model` takes too.
    res = cli("predict", "--local", str(vertical["build"]), "--model", str(shop_dir), "--model",
              str(media_dir))
    assert res.exit_code == EXIT_OK, res.stderr
    got = _read_scores(res.stdout)
    np.testing.assert_allclose([got[i] for i in ids], [want[i] for i in ids], rtol=1e-5, atol=1e-6)
    # An existing folder as -o: the SavedModel goes inside it (as cp does), never over a folder.
    again = ["model", "decrypt", str(models / f"{MEDIA}_model.savedmodel.sealed"), "--node", MEDIA, "--name",
             f"{MEDIA}/model/savedmodel", "--key-file", str(vertical["trust"] / "media" / "sealing.key"),
             "-o", str(media_dir)]
    assert cli(*again).exit_code == EXIT_OK
    assert (media_dir / f"{MEDIA}_model.savedmodel" / "saved_model.pb").is_file()
    res = cli(*again)
    assert res.exit_code == EXIT_INPUT and "exists" in res.output


def test_predict_input_errors_exit_2_and_tampering_3(vertical: dict[str, Path]) -> None:
    root, build = vertical["root"], vertical["build"]
    base = ["predict", "--local", str(build), "--model", str(vertical["run"]), "--trust-dir",
            str(vertical["trust"])]
    res = cli(*base, "--data", "shop.nope=x.csv")
    assert res.exit_code == EXIT_INPUT and "--data shop.nope: not a data set" in res.stderr
    res = cli(*base, "--data", "media.impressions=x.csv")
    assert res.exit_code == EXIT_INPUT and "generated (wide_n_deep)" in res.stderr
    bad = root / "bad.csv"
    bad.write_text("example_id," + ",".join(f"f{i}" for i in range(8)) + "\n1,1,2,3,4,5,6,7,x\n")
    res = cli(*base, "--data", f"shop.conversions={bad}")
    assert res.exit_code == EXIT_INPUT and f"{bad}:2: column `f7`" in res.stderr
    res = cli(*base, "--data", "shop.conversions")  # the plan's own file, like no --data
    assert res.exit_code == EXIT_OK

    # A model trained from another plan than the build's is refused, naming it.
    other = root / "other-build"
    import shutil

    shutil.copytree(build, other / build.name)
    buildkit.recompile_plan(other / build.name, MEDIA, lambda p: setattr(p.train, "seed", 99))
    res = cli("predict", "--local", str(other / build.name), "--model", str(vertical["run"]), "--trust-dir",
              str(vertical["trust"]))
    assert res.exit_code == EXIT_INPUT and "another plan" in res.stderr

    # A modified pack does not authenticate: trust failure, nothing scored.
    run2 = root / "run2"
    shutil.copytree(vertical["run"] / "models", run2 / "models")
    pack = run2 / "models" / f"{MEDIA}_model.savedmodel.sealed"
    blob = bytearray(pack.read_bytes())
    blob[-40] ^= 1
    pack.write_bytes(bytes(blob))
    res = cli("predict", "--local", str(build), "--model", str(run2), "--trust-dir", str(vertical["trust"]))
    assert res.exit_code == EXIT_TRUST and res.stdout == ""


def test_horizontal_predict_is_the_aggregated_model(tmp_path: Path) -> None:
    """The aggregator's SavedModel scores a worker's rows exactly as its exported weights do."""
    from fldsl.runtime.data import load_dataset
    from fldsl.stdlib.tf import build_segment, scores

    build = buildkit.horizontal_build(tmp_path, epochs=1, rows=200)
    res = memlink.run_in_threads(build, tmp_path / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    trust = _trust_dir(tmp_path)
    out = cli("predict", str(build), "--model", str(tmp_path / "run"), "--trust-dir", str(trust),
              "--data", "bank2.clicks")
    assert out.exit_code == EXIT_OK, out.stderr
    assert "(horizontal, local)" in out.stderr
    got = _read_scores(out.stdout)

    server = load_model(Plan, node_dir(build, "hub.ps") / "plan.json")
    worker = load_model(Plan, node_dir(build, "bank2.worker") / "plan.json")
    table = load_dataset(worker.data[0])
    npz = np.load(io.BytesIO(bytes(sealing.unseal_file(
        tmp_path / "run" / "models" / "hub.ps_model.sealed", key=memlink.KEY, node_id="hub.ps",
        name="hub.ps/model"))))
    seg = build_segment(server.model, {"clicks.dense": worker.data[0].fields["dense"]},
                        seed=server.train.seed)
    seg.set_weights([npz[k] for k in sorted(npz.files)])
    want = scores(server.loss, seg({"clicks.dense": table.fields["dense"]})["logits"]).numpy()
    assert list(got) == [str(i) for i in table.ids.tolist()]
    np.testing.assert_allclose(list(got.values()), want, rtol=1e-5, atol=1e-6)

    none = cli("predict", str(build), "--model", str(tmp_path / "run"), "--trust-dir", str(trust))
    assert none.exit_code == EXIT_INPUT and "bank1.clicks, bank2.clicks" in none.stderr


def test_a_synchronous_parameter_server_serves_the_global_models_logits(tmp_path: Path) -> None:
    """Its plan has the model but not the loss (the workers compute it); its export used to stop the run
    (the shipped horizontal_dlrm pipeline ended with exit 1 at export)."""
    from fldsl.api import compile_pipeline
    from fldsl.artifacts import Plan, Policy, load_model, node_dir
    from fldsl.runtime.savedmodel import _outputs

    pipelines = Path(__file__).resolve().parents[2] / "pipelines"
    build = compile_pipeline(pipelines / "horizontal_dlrm.flp", tmp_path / "b").build_dir
    plan = load_model(Plan, node_dir(build, "hub.ps") / "plan.json")
    policy = load_model(Policy, node_dir(build, "hub.ps") / "policy.json")
    assert plan.loss is None and _outputs(plan, policy) == {"logits": "logits"}


# ---------------------------------------------------------------------------------------------------------
# Preprocessing inside the SavedModel, and the split path over the attested channel
# ---------------------------------------------------------------------------------------------------------


def _census(root: Path, rows: int = 600) -> Path:
    """test_preprocess's census pipeline (empty cells, `?` tokens, string categories, 3 classes), small,
    with one column bucketized."""
    from test_preprocess import PIPELINE, _write_data

    _write_data(root / "data", rows)
    flp = root / "census.flp"
    # visits bucketized here (one-hot of [<2, 2-5, 5-10, >=10]): the SavedModel's TensorFlow buckets must
    # match preprocess.apply's, which trained the model.
    src = PIPELINE.replace("epochs: 8", "epochs: 2").replace("scale: clip(0, 20)", "bucketize: [2, 5, 10]")
    flp.write_text(src)
    return _compile(flp, root / "build")


def _compile(flp: Path, out: Path) -> Path:
    """Compile with the code as it is now: the simulated measurement pins the installed code, which other
    work in the same checkout may change between tests."""
    from fldsl.api import compile_pipeline
    from fldsl.measurement import code_digest

    code_digest.cache_clear()
    return compile_pipeline(flp, out).build_dir


def _until_code_settles(fn: Any) -> Any:
    """``fn(attempt)`` again (at most 3 times) while it fails because the code changed under it (the peers
    then refuse each other's measurement: exit 3)."""
    from fldsl.measurement import code_digest

    for attempt in range(3):
        code_digest.cache_clear()
        before = code_digest()
        result = fn(attempt)
        if getattr(result, "exit_code", 0) != EXIT_TRUST or code_digest.__wrapped__() == before:
            return result
    return result


def _class_scores(text: str) -> dict[str, list[float]]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["id", "score_0", "score_1", "score_2"], rows[0]
    return {r[0]: [float(x) for x in r[1:]] for r in rows[1:]}


def _csv_cells(path: Path, ids: list[str], columns: list[str]) -> np.ndarray:
    """The csv's own cells (text as written: empty, `?`, categories) of ``columns`` for ``ids``."""
    rows = {r["id"]: r for r in csv.DictReader(path.open())}
    return np.array([[rows[i][c] for c in columns] for i in ids], dtype=object).astype(str)


def test_savedmodel_applies_the_fitted_preprocessing_to_raw_rows(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    monkeypatch.chdir(tmp_path)
    build = _census(tmp_path)
    res = memlink.run_in_threads(build, tmp_path / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    folders = {}
    for node in ("bank.n", "shop.n"):
        data = sealing.unseal_file(tmp_path / "run" / "models" / f"{node}_model{sm.SUFFIX}.sealed",
                                   key=memlink.KEY, node_id=node, name=sm.export_name(f"{node}/model"))
        folders[node] = tmp_path / node
        sm.unpack(data, folders[node])
    bank_card = sm.read_card(folders["bank.n"])
    want = _class_scores((folders["bank.n"] / sm.HOLDOUT_FILE).read_text())
    ids = list(want)

    # The card records the statistics the run fitted (the same as the weights export's member).
    npz = np.load(io.BytesIO(bytes(sealing.unseal_file(
        tmp_path / "run" / "models" / "bank.n_model.sealed", key=memlink.KEY, node_id="bank.n",
        name="bank.n/model"))))
    assert bank_card["preprocessing"] == json.loads(npz["preprocessing"].tobytes())
    inp = bank_card["signature"]["inputs"]["people_features"]
    assert inp["dtype"] == "string" and inp["raw"] and inp["columns"] == ["age", "capital-gain", "education"]

    # Plain TensorFlow on the files' own text: empty cells, `?`, category names, unscaled numbers.
    bank_cells = _csv_cells(tmp_path / "data" / "bank.csv", ids, inp["columns"])
    shop_cols = sm.read_card(folders["shop.n"])["signature"]["inputs"]["baskets_features"]["columns"]
    shop_cells = _csv_cells(tmp_path / "data" / "shop.csv", ids, shop_cols)
    assert (bank_cells == "").any() and (bank_cells == "?").any() and (shop_cells == "").any()
    shop_fn = tf.saved_model.load(str(folders["shop.n"])).signatures["serving_default"]
    bank_fn = tf.saved_model.load(str(folders["bank.n"])).signatures["serving_default"]
    a = shop_fn(baskets_features=tf.constant(shop_cells))["a"]
    got = bank_fn(people_features=tf.constant(bank_cells), a=a)["scores"].numpy()
    np.testing.assert_allclose(got, [want[i] for i in ids], rtol=1e-5, atol=1e-6)

    # fldsl predict --local reads the same raw files and gives the same scores.
    out = cli("predict", str(build), "--local", "--model", str(folders["bank.n"]), "--model",
              str(folders["shop.n"]))
    assert out.exit_code == EXIT_OK, out.stderr
    scored = _class_scores(out.stdout)
    np.testing.assert_allclose([scored[i] for i in ids], [want[i] for i in ids], rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_split_predict_over_the_attested_channel_equals_the_runs_holdout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real node processes over real gRPC and TLS: training, then `fldsl predict` with each party's node
    opening its own sealed model; the label owner's `id,score` equals the run's holdout scores id for id."""
    import shutil

    from fldsl.runtime.launcher import run_pipeline, tail

    monkeypatch.chdir(tmp_path)
    _census(tmp_path, rows=400)
    flp, trust = tmp_path / "census.flp", tmp_path / "trust"
    run = _until_code_settles(lambda k: run_pipeline(_compile(flp, tmp_path / f"build{k}"),
                                                     run_dir=tmp_path / f"run{k}", trust_dir=trust))
    assert run.exit_code == 0, [(n, s.error, tail(s.log_path)) for n, s in run.nodes.items()]
    shutil.move(run.run_dir, tmp_path / "run")
    data = sealing.unseal_file(tmp_path / "run" / "models" / f"bank.n_model{sm.SUFFIX}.sealed",
                               key=(trust / "bank" / "sealing.key").read_bytes(), node_id="bank.n",
                               name=sm.export_name("bank.n/model"))
    want = _class_scores(sm.unpack(data, tmp_path / "bank-model") and
                         (tmp_path / "bank-model" / sm.HOLDOUT_FILE).read_text())

    # New rows for the label owner: only the holdout ids, columns shuffled, no label column.
    rows = list(csv.DictReader((tmp_path / "data" / "bank.csv").open()))
    cols = ["education", "id", "capital-gain", "age"]
    new = tmp_path / "new_bank.csv"
    with new.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([r[c] for c in cols] for r in rows if r["id"] in want)
    out = tmp_path / "scores.csv"
    res = _until_code_settles(lambda k: cli(
        "predict", str(_compile(flp, tmp_path / f"pbuild{k}")), "--model", str(tmp_path / "run"),
        "--trust-dir", str(trust), "--data", f"bank.people={new}", "-o", str(out),
        "--run-dir", str(tmp_path / f"predict{k}")))
    pdir = sorted(tmp_path.glob("predict*"))[-1]
    logs = {p.name: p.read_text()[-2000:] for p in (pdir / "logs").glob("*.log")}
    assert res.exit_code == EXIT_OK, (res.stderr, logs)
    assert "split over the attested channel" in res.stderr
    got = _class_scores(out.read_text())
    assert list(got) == list(want) or set(got) == set(want)
    for i, s in want.items():
        np.testing.assert_allclose(got[i], s, rtol=1e-5, atol=1e-6, err_msg=i)
    # What crossed: the psi, holdout (row positions), control and activation flows, and nothing else.
    events = [json.loads(x) for x in (pdir / "metrics.jsonl").read_text().splitlines()]
    sent = {k for e in events if e.get("event") == "done" for k in e.get("bytes_sent", {})}
    assert any(":a" in k or k.endswith("a") for k in sent)
    assert not any("grad" in k or "label" in k for k in sent), sent

    # A model of another pipeline (here: the same nodes recompiled with another seed) is refused by the
    # node before it meets any peer, naming it; exit 2.
    (tmp_path / "census2.flp").write_text(flp.read_text().replace("seed: 5", "seed: 6"))
    other = _compile(tmp_path / "census2.flp", tmp_path / "other")
    res = cli("predict", str(other), "--model", str(tmp_path / "run"), "--trust-dir", str(trust),
              "--run-dir", str(tmp_path / "refused"))
    assert res.exit_code == EXIT_INPUT, res.stderr
    assert "trained from another plan" in res.stderr, res.stderr
