"""Every example pipeline checks and compiles; output is deterministic; measurements track what changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fldsl.api import check, compile_pipeline, load_or_compile
from fldsl.artifacts import Pins, Plan, Policy, load_model, sha256_hex
from fldsl.compiler.manifest import trusted_node_files
from fldsl.measurement import sim_mr_enclave

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"
GENERATED = ["vertical_wide_deep", "horizontal_dlrm", "distributed_dlrm"]
FATE = ["fate_breast_vertical", "fate_credit_vertical", "fate_breast_horizontal", "fate_credit_horizontal"]


def fate_dir() -> Path:
    env = os.environ.get("FLDSL_SHARED_DATA")
    return (Path(env) if env else REPO.parent / "shared" / "data") / "fate"


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", GENERATED)
def test_generated_pipelines_check_and_compile(name: str, tmp_path: Path) -> None:
    program = check(PIPELINES / f"{name}.flp")
    assert program.pipeline == name
    result = compile_pipeline(PIPELINES / f"{name}.flp", tmp_path / "b")
    files = _tree(result.build_dir)
    assert "pipeline.json" in files
    for n in program.nodes:
        for f in ("plan.json", "policy.json", "pins.json"):
            assert f"nodes/{n.id}/{f}" in files
        node = n.id.split(".", 1)[1]
        assert f"nodes/{n.id}/{node}.manifest.toml" in files
        assert f"nodes/{n.id}/{node}.manifest.template" in files


@pytest.mark.shared_data
@pytest.mark.parametrize("name", FATE)
def test_fate_pipelines_check_and_compile(name: str, tmp_path: Path) -> None:
    params = {"data_dir": str(fate_dir())}
    program = check(PIPELINES / f"{name}.flp", params)
    for ds in program.datasets:
        assert ds.spec.path is not None and Path(ds.spec.path).is_absolute()
        assert ds.spec.feature_columns and all(c.startswith("x") for c in ds.spec.feature_columns)
    compile_pipeline(PIPELINES / f"{name}.flp", tmp_path / "b", params)


@pytest.mark.parametrize("name", FATE)
def test_fate_pipelines_compile_without_any_data(name: str, tmp_path: Path) -> None:
    """Their schema blocks describe every file: a party compiles on a machine that holds none of them."""
    params = {"data_dir": "/nonexistent"}
    program = check(PIPELINES / f"{name}.flp", params)
    for ds in program.datasets:
        assert ds.spec.columns and ds.spec.max_rows and ds.rows == ds.spec.max_rows
        assert ds.spec.path is not None and ds.spec.path.startswith("/nonexistent/")
    compile_pipeline(PIPELINES / f"{name}.flp", tmp_path / "b", params)


@pytest.mark.shared_data
def test_fate_build_is_the_same_with_or_without_the_files(tmp_path: Path) -> None:
    """Issue #10: each party compiles the same .flp on its own machine, holding only its own file (or
    none), and gets the same bytes and digest as a machine that holds every file."""
    name = "fate_breast_vertical"
    data = tmp_path / "data"
    data.mkdir()
    for f in ("breast_hetero_guest.csv", "breast_hetero_host.csv"):
        shutil.copy(fate_dir() / f, data / f)
    builds = {}
    for case in ("all files", "guest's only", "none"):
        if case == "guest's only":
            (data / "breast_hetero_host.csv").unlink()
        if case == "none":
            shutil.rmtree(data)
        party_dir = tmp_path / case.replace(" ", "_").replace("'", "")
        party_dir.mkdir()
        flp = party_dir / f"{name}.flp"  # each party's own copy, wherever it keeps it
        shutil.copy(PIPELINES / f"{name}.flp", flp)
        builds[case] = compile_pipeline(flp, tmp_path / "build" / case, {"data_dir": str(data)})
    ref = builds["all files"]
    for case, b in builds.items():
        assert b.digest == ref.digest, case
        assert _tree(b.build_dir) == _tree(ref.build_dir), case


@pytest.mark.shared_data
@pytest.mark.parametrize("name", FATE)
def test_fate_schema_blocks_pass_the_node_check_of_the_real_files(name: str, tmp_path: Path) -> None:
    """What each node checks when it starts: the shipped blocks match the FATE files."""
    from fldsl.runtime.csvschema import check_schemas

    result = compile_pipeline(PIPELINES / f"{name}.flp", tmp_path / "b", {"data_dir": str(fate_dir())})
    for d in sorted((result.build_dir / "nodes").iterdir()):
        check_schemas(load_model(Plan, d / "plan.json").data)


def test_compile_twice_is_byte_identical(tmp_path: Path) -> None:
    a = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "a")
    b = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "b")
    assert a.digest == b.digest
    assert _tree(a.build_dir) == _tree(b.build_dir)
    # Recompiling into the same directory replaces it cleanly.
    c = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "a")
    assert _tree(c.build_dir) == _tree(b.build_dir)


def _with_train_setting(tmp_path: Path, name: str, after: str, setting: str) -> Path:
    src = (PIPELINES / f"{name}.flp").read_text()
    assert src.count(after) == 1
    tmp_path.mkdir(parents=True, exist_ok=True)
    # Same file name and the setting on the same line: source positions in the artifacts stay the same.
    flp = tmp_path / f"{name}.flp"
    flp.write_text(src.replace(after, f"{after}  {setting}"))
    return flp


def test_train_pipeline_setting_reaches_every_plan(tmp_path: Path) -> None:
    plain = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "plain")
    for d in sorted((plain.build_dir / "nodes").iterdir()):
        # Unset, the key is not written at all: plans compiled before the setting existed keep their bytes.
        assert "pipeline" not in json.loads((d / "plan.json").read_text())["train"]
    zero = compile_pipeline(_with_train_setting(tmp_path / "z", "vertical_wide_deep", "validation: 0.2",
                                                "pipeline: 0"), tmp_path / "zero")
    assert _tree(zero.build_dir / "nodes") == _tree(plain.build_dir / "nodes")
    one = compile_pipeline(_with_train_setting(tmp_path / "o", "vertical_wide_deep", "validation: 0.2",
                                               "pipeline: 1"), tmp_path / "one")
    for d in sorted((one.build_dir / "nodes").iterdir()):
        assert json.loads((d / "plan.json").read_text())["train"]["pipeline"] == 1
        assert load_model(Plan, d / "plan.json").train.pipeline == 1
    # A different protocol is a different measured plan.
    assert (one.build_dir / "nodes/media.trainer/plan.json").read_bytes() != \
        (plain.build_dir / "nodes/media.trainer/plan.json").read_bytes()


def test_train_pipeline_is_for_vertical_pipelines_only(tmp_path: Path) -> None:
    from fldsl.diagnostics import FldslError

    flp = _with_train_setting(tmp_path, "horizontal_dlrm", "validation: 0.1", "pipeline: 1")
    with pytest.raises(FldslError) as ei:
        check(flp)
    [err] = ei.value.errors
    line = next(k for k, text in enumerate(flp.read_text().splitlines(), 1) if "pipeline: 1" in text)
    assert (err.line, err.column) == (line, len("  validation: 0.1  ") + 1)
    assert err.message.startswith("`pipeline:` is for vertical pipelines")


def test_train_pipeline_with_checkpoint_every_step_warns(tmp_path: Path) -> None:
    flp = _with_train_setting(tmp_path, "vertical_wide_deep", "validation: 0.2", "pipeline: 1")
    flp.write_text(flp.read_text().replace("checkpoint: every 100 steps", "checkpoint: every 1 steps"))
    program = check(flp)
    assert [w.message for w in program.warnings] == [
        "`pipeline: 1` has no effect with `checkpoint: every 1 steps`: "
        "the pipeline drains at every checkpoint"
    ]


def test_artifacts_are_consistent(tmp_path: Path) -> None:
    r = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "b")
    pins = load_model(Pins, r.build_dir / "nodes/media.trainer/pins.json")
    pf = json.loads((r.build_dir / "pipeline.json").read_text())
    assert pf["digest"] == r.digest
    assert "/" not in pf["source"]
    for node in ("media.trainer", "shop.trainer"):
        d = r.build_dir / "nodes" / node
        assert (d / "pins.json").read_bytes() == (r.build_dir / "nodes/shop.trainer/pins.json").read_bytes()
        toml = (d / "trainer.manifest.toml").read_bytes()
        # The pinned measurement is the simulated MRENCLAVE of exactly this manifest ...
        assert pins.nodes[node].mr_enclave == [sim_mr_enclave(toml)]
        assert pins.nodes[node].isv_prod_id == 1 and pins.nodes[node].isv_svn_min == 1
        # ... and the manifest measures exactly the plan and policy that were written.
        trusted = trusted_node_files(toml.decode())
        assert trusted["plan.json"] == sha256_hex((d / "plan.json").read_bytes())
        assert trusted["policy.json"] == sha256_hex((d / "policy.json").read_bytes())
        load_model(Plan, d / "plan.json")
        load_model(Policy, d / "policy.json")


def _compile_variant(tmp_path: Path, name: str, old: str, new: str) -> dict[str, str]:
    src = (PIPELINES / "vertical_wide_deep.flp").read_text()
    assert src.count(old) == 1
    # Same file name for every variant: the name appears in rule spans (policy.json), so it is measured.
    (tmp_path / name).mkdir()
    f = tmp_path / name / "vertical_wide_deep.flp"
    f.write_text(src.replace(old, new))
    r = compile_pipeline(f, tmp_path / name / "build")
    pins = load_model(Pins, r.build_dir / "nodes/media.trainer/pins.json")
    return {"digest": r.digest, **{n: i.mr_enclave[0] for n, i in pins.nodes.items()}}


def test_changing_units_changes_affected_measurements_and_digest(tmp_path: Path) -> None:
    base = _compile_variant(tmp_path, "base", "units: [32, 2]", "units: [32, 2]")
    top = _compile_variant(tmp_path, "top", "units: [32, 2]", "units: [16, 2]")
    # Only the shop runs the top model: its measurement changes, the media party's does not.
    assert top["shop.trainer"] != base["shop.trainer"]
    assert top["media.trainer"] == base["media.trainer"]
    assert top["digest"] != base["digest"]
    same = _compile_variant(tmp_path, "same", "units: [32, 2]", "units: [32, 2]")
    assert same == base


def test_declared_cut_shape_must_follow_units(tmp_path: Path) -> None:
    from fldsl.diagnostics import FldslError

    src = (PIPELINES / "vertical_wide_deep.flp").read_text()
    f = tmp_path / "vertical_wide_deep.flp"
    f.write_text(src.replace("units: [64])\n  at shop:  act2", "units: [32])\n  at shop:  act2"))
    with pytest.raises(FldslError) as ei:
        check(f)
    assert ei.value.errors[0].message == (
        "declared `float32[batch, 64]` for `act1` but it is inferred as `float32[batch, 32]`"
    )
    f.write_text(f.read_text().replace("float32[batch, 64]", "float32[batch, 32]"))
    base = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "base")
    narrow = compile_pipeline(f, tmp_path / "narrow")
    a = load_model(Pins, base.build_dir / "nodes/media.trainer/pins.json").nodes
    b = load_model(Pins, narrow.build_dir / "nodes/media.trainer/pins.json").nodes
    assert a["media.trainer"].mr_enclave != b["media.trainer"].mr_enclave
    assert a["shop.trainer"].mr_enclave != b["shop.trainer"].mr_enclave


def test_set_overrides_params_and_changes_digest(tmp_path: Path) -> None:
    a = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "a")
    b = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path / "b", {"rows": "500"})
    plan = load_model(Plan, b.build_dir / "nodes/media.trainer/plan.json")
    assert plan.data[0].params["rows"] == 500
    assert a.digest != b.digest


def test_load_or_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    built = load_or_compile(PIPELINES / "vertical_wide_deep.flp")
    assert built == Path("build/vertical_wide_deep")
    assert (built / "pipeline.json").is_file()
    assert load_or_compile(built) == built


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    from fldsl.diagnostics import FldslError

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FldslError, match="refusing to overwrite"):
        compile_pipeline(PIPELINES / "vertical_wide_deep.flp", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_failed_emit_keeps_previous_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fldsl.compiler import manifest_check
    from fldsl.diagnostics import FldslError

    out = tmp_path / "b"
    first = compile_pipeline(PIPELINES / "vertical_wide_deep.flp", out)
    before = _tree(out)

    def lint_fails(toml_text: str, lint: object = None) -> list[manifest_check.Finding]:
        return [manifest_check.Finding(code="insecure-key", key="loader.x", message="bad", severity="error")]

    monkeypatch.setattr(manifest_check, "validate_manifest", lint_fails)
    with pytest.raises(FldslError) as ei:
        compile_pipeline(PIPELINES / "vertical_wide_deep.flp", out, {"rows": "100"})
    assert "manifest of node `media.trainer`: loader.x: bad [insecure-key]" in ei.value.errors[0].message
    assert _tree(out) == before and first.build_dir == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folder left behind
