"""CSV data for nodes inside Gramine, without Gramine: what the node, the launcher and the CLI decide.

The path through a real enclave (keys, encrypted mount, integrity failures) is tests/enclave/
test_gramine_data.py; these check the same decisions in milliseconds: where a node reads its files, which
failures are trust failures, what ``fldsl run`` refuses before anything starts, and where exported files
are reported.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildkit

from fldsl.artifacts import DataSpec, Plan, dump_json, load_model, node_dir
from fldsl.runtime import enclave_runner, keyservice
from fldsl.runtime import node as N
from fldsl.runtime.launcher import Launcher
from fldsl.runtime.progress import Progress
from fldsl.runtime.transport import Addresses, NodeAddress

NODE = "shop.trainer"


def _args(runner: str) -> argparse.Namespace:
    return argparse.Namespace(runner=runner, node=NODE, connect_timeout=5.0)


def _addresses(key_service: str | None) -> Addresses:
    return Addresses({NODE: NodeAddress(host="127.0.0.1", port=1, bootstrap_port=2, key_service=key_service)})


def _plan(tmp_path: Path) -> Plan:
    build = buildkit.vertical_build(tmp_path)
    plan = load_model(Plan, node_dir(build, NODE) / "plan.json")
    return plan.model_copy(update={"data": [DataSpec(name="t", reader="csv", path="/host/shop/train.csv")]})


@pytest.fixture
def fake_keys(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(keyservice, "fetch_key", lambda address, **kw: calls.append(("fetch", address)) or
                        bytes(16))
    monkeypatch.setattr(keyservice, "install_gramine_key", lambda name, key: calls.append(("install", name)))
    return calls


def test_only_a_gramine_node_with_csv_data_fetches_a_key_and_reads_the_mount(
        tmp_path: Path, fake_keys: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(tmp_path)
    progress = Progress(NODE, stream=io.StringIO())
    assert N.provision_data(_args("native"), plan, None, _addresses(None), progress) is plan  # type: ignore[arg-type]
    checked: list[str] = []
    monkeypatch.setattr(N, "_check_protected", lambda spec: checked.append(str(spec.path)))
    out = N.provision_data(_args("gramine"), plan, None, _addresses("owner:7443"), progress)  # type: ignore[arg-type]
    assert fake_keys == [("fetch", "owner:7443"), ("install", "data")]
    assert [d.path for d in out.data] == ["/fldsl/data/train.csv"] == checked
    assert plan.data[0].path == "/host/shop/train.csv"
    with pytest.raises(N.NodeError, match=rf"--key-service {NODE}=HOST:PORT"):
        N.provision_data(_args("gramine"), plan, None, _addresses(None), progress)  # type: ignore[arg-type]


def test_a_protected_file_that_gramine_refuses_is_a_one_line_trust_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = DataSpec(name="t", reader="csv", path=str(tmp_path / "train.csv"))
    with pytest.raises(N.NodeError, match="does not exist") as e:
        N._check_protected(spec)
    assert e.value.code == N.EXIT_FAILED

    def refused(path: str, mode: str = "r") -> Any:  # what Gramine answers for a file that fails its check
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(N, "open", refused, raising=False)
    with pytest.raises(N.NodeError) as e:
        N._check_protected(spec)
    assert e.value.code == N.EXIT_TRUST and "\n" not in str(e.value)
    assert f"{tmp_path}/train.csv fails Gramine's integrity check" in str(e.value)


def test_key_service_failures_are_classified() -> None:
    assert N._classify(keyservice.KeyReplyError("reply does not open"))[0] == N.EXIT_TRUST
    unavailable = keyservice.KeyServiceUnavailable("k:1 unreachable")
    assert N._classify(unavailable) == (N.EXIT_FAILED, "k:1 unreachable")
    refused = keyservice.KeyRefused("grant", "a", "b", "refused key `data`: grant")
    assert N._classify(refused) == (N.EXIT_TRUST, "trust failure: refused key `data`: grant")


def _csv_build(tmp_path: Path) -> Path:
    build = buildkit.vertical_build(tmp_path)
    f = node_dir(build, NODE) / "plan.json"
    plan = load_model(Plan, f)
    f.write_text(dump_json(plan.model_copy(update={"data": [
        DataSpec(name="t", reader="csv", path="/host/shop/train.csv")]}).model_dump(mode="json")))
    return build


def test_fldsl_run_refuses_data_inputs_that_cannot_work_before_anything_starts(tmp_path: Path) -> None:
    build = _csv_build(tmp_path / "b")
    ids = ["media.trainer", NODE]
    data = tmp_path / "enc"
    data.mkdir()

    def check(enclave: str, dirs: dict[str, Path], services: dict[str, str]) -> None:
        enclave_runner.check_data_inputs(build, ids, enclave, dirs, services)  # type: ignore[arg-type]

    check("none", {}, {})  # plain files at the plan's path, as before
    with pytest.raises(enclave_runner.EnclaveError, match="are for --enclave runs"):
        check("none", {NODE: data}, {})
    with pytest.raises(enclave_runner.EnclaveError, match=rf"add --data-dir {NODE}=\.\.\. and --key-service"):
        check("gramine-direct", {}, {})
    with pytest.raises(enclave_runner.EnclaveError, match=r"has no train\.csv"):
        check("gramine-direct", {NODE: data}, {NODE: "k:1"})
    (data / "train.csv").write_bytes(b"encrypted")
    check("gramine-direct", {NODE: data}, {NODE: "k:1"})
    with pytest.raises(enclave_runner.EnclaveError, match=r"media\.trainer reads no csv data"):
        check("gramine-direct", {NODE: data, "media.trainer": data}, {NODE: "k:1"})
    with pytest.raises(enclave_runner.EnclaveError, match=r"no node bank\.x"):
        check("gramine-direct", {NODE: data}, {NODE: "k:1", "bank.x": "k:2"})


def test_the_working_folder_links_data_to_this_runs_folder(tmp_path: Path) -> None:
    build = buildkit.vertical_build(tmp_path / "b")
    run, trust, data = tmp_path / "run", tmp_path / "trust", tmp_path / "enc"
    for d in (run, trust, data, build / "pycache"):
        d.mkdir()
    _, work = enclave_runner.prepare(build, NODE, run, trust, "gramine-direct")
    assert (work / "data").is_dir() and not (work / "data").is_symlink()
    _, work = enclave_runner.prepare(build, NODE, run, trust, "gramine-direct", data)  # a resumed run
    assert (work / "data").resolve() == data.resolve()
    _, work = enclave_runner.prepare(build, NODE, run, trust, "gramine-direct")
    assert not (work / "data").is_symlink()  # an earlier run's data is not this run's


def test_owner_exports_are_reported_by_their_host_paths(tmp_path: Path) -> None:
    build = buildkit.vertical_build(tmp_path / "b")
    launcher = Launcher(build, run_dir=tmp_path / "run", trust_dir=tmp_path / "trust",
                        enclave="gramine-direct")
    st = launcher.nodes[NODE]
    launcher._on_event(st, {"event": "done", "node": NODE,
                            "exports": {"m": "/fldsl/run/models/shop.trainer_model.sealed"},
                            "owner_exports": {"m": "/fldsl/run/models/shop.trainer_model.owner"}})
    run = (tmp_path / "run").resolve()
    assert st.done is not None
    assert st.done["owner_exports"] == {"m": str(run / "models" / "shop.trainer_model.owner")}
    assert st.done["exports"] == {"m": str(run / "models" / "shop.trainer_model.sealed")}


def test_the_summary_gives_the_owner_their_decrypt_command(tmp_path: Path) -> None:
    from rich.console import Console

    from fldsl.cli.run import print_summary
    from fldsl.runtime.launcher import NodeState, RunResult

    owner_file = str(tmp_path / "models" / "shop.trainer_model.owner")
    st = NodeState(id=NODE, role="vertical.leader", exit_code=0,
                   done={"exports": {}, "owner_exports": {f"{NODE}/model": owner_file}})
    result = RunResult(pipeline="p", run_dir=tmp_path, exit_code=0, nodes={NODE: st}, seconds=1.0)
    assert result.to_json()["nodes"][NODE]["owner_exports"] == {f"{NODE}/model": owner_file}
    out = io.StringIO()
    print_summary(Console(file=out, width=400), result)
    assert f"fldsl model decrypt {owner_file} --owner-key PRIVATE.pem -o OUT.npz" in out.getvalue()
