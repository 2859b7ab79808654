"""`--data NAME=PATH`: a party binds its own csv where it lives on its machine; bad bindings are input errors
(exit 2) naming the data set, before anything starts. `--listen` and friends belong to `fldsl run --node`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fldsl.artifacts import DataSpec, Plan, load_model, node_dir
from fldsl.cli import main
from fldsl.runtime.node import EXIT_INPUT, NodeError, bind_data


def _plan(tmp_path: Path) -> Plan:
    import buildkit

    build = buildkit.vertical_build(tmp_path, rows=50)
    plan = load_model(Plan, node_dir(build, "shop.trainer") / "plan.json")
    plan.data = [DataSpec(name="conversions", reader="csv", path="/srv/elsewhere/conversions.csv",
                          id_column="id", label_column="y", feature_columns=["x"]),
                 DataSpec(name="generated", reader="wide_n_deep", params={"rows": 5})]
    return plan


def test_a_binding_replaces_only_that_data_sets_path(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    local = tmp_path / "mine.csv"
    local.write_text("id,y,x\n1,0,0.5\n")
    bound = bind_data(plan, [f"conversions={local}"])
    assert bound.data[0].path == str(local.resolve()) and bound.data[1] == plan.data[1]
    assert plan.data[0].path == "/srv/elsewhere/conversions.csv"  # the measured plan object is untouched
    assert bind_data(plan, []) is plan


@pytest.mark.parametrize(("binding", "message"), [
    ("conversion=x.csv", "reads no data set `conversion` (its data sets: conversions, generated)"),
    ("generated=x.csv", "is generated (wide_n_deep)"),
    ("conversions", "expects NAME=PATH"),
    ("conversions=/nonexistent/c.csv", "/nonexistent/c.csv: no such file"),
])
def test_bad_bindings_are_input_errors(tmp_path: Path, binding: str, message: str) -> None:
    with pytest.raises(NodeError, match="--data") as e:
        bind_data(_plan(tmp_path), [binding])
    assert e.value.code == EXIT_INPUT and message in str(e.value)


def test_node_flags_without_node_are_a_usage_error(tmp_path: Path) -> None:
    import buildkit

    build = buildkit.vertical_build(tmp_path, rows=50)
    for flag in (["--listen", "0.0.0.0"], ["--data", "a=b"], ["--connect-timeout", "5"]):
        res = CliRunner().invoke(main, ["run", str(build), *flag])
        assert res.exit_code == 2 and "go with --node" in res.output, res.output


def test_the_listen_address_comes_from_the_flag_then_the_addresses_file_then_loopback() -> None:
    import argparse

    from fldsl.runtime.node import _listen_host
    from fldsl.runtime.transport import Addresses

    addresses = Addresses.model_validate({
        "a.n": {"host": "a.example", "port": 7443, "bootstrap_port": 7444, "listen": "0.0.0.0"},
        "b.n": {"host": "b.example", "port": 7443, "bootstrap_port": 7444}})
    assert _listen_host(argparse.Namespace(node="a.n", listen=None), addresses) == "0.0.0.0"
    assert _listen_host(argparse.Namespace(node="a.n", listen="10.0.0.5"), addresses) == "10.0.0.5"
    assert _listen_host(argparse.Namespace(node="b.n", listen=None), addresses) == "127.0.0.1"
