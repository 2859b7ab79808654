"""Information-flow checks: values carry their private sources; crossing a party needs an allow rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from fldsl.api import check, check_source
from fldsl.diagnostics import FldslError

from ._base import BASE, mutate

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _errors(src: str) -> list[str]:
    with pytest.raises(FldslError) as ei:
        check_source(src, "demo.flp")
    return [d.message for d in ei.value.errors]


def test_label_gradient_to_passive_needs_allow() -> None:
    errors = _errors(mutate("  allow shop -> media: grad(act1)\n", ""))
    assert errors == [
        "information flow: `grad(act1)` would carry `shop.conversions.label` to `media`: "
        "shop.conversions.label → loss → grad(act1) → media (no allow rule)"
    ]


def test_activation_needs_allow_and_shows_path() -> None:
    errors = _errors(mutate("  allow media -> shop: act1 as float32[batch, 16]\n", ""))
    assert errors == [
        "information flow: `act1` would carry `media.impressions.sparse` to `shop`: "
        "media.impressions.sparse → act1/embed → act1 → shop (no allow rule)"
    ]


def test_raw_feature_column_sent_across() -> None:
    src = mutate("concat(act2, act1)", "concat(act2, act1, impressions.sparse)")
    assert _errors(src) == [
        "raw feature column `media.impressions.sparse` would be sent to `shop` without an allow rule: "
        "media.impressions.sparse → shop (no allow rule)"
    ]
    # With an explicit rule the raw column becomes a declared data flow (no gradient returns for it).
    allowed = mutate(
        "  at_rest encrypted", "  allow media -> shop: impressions.sparse\n  at_rest encrypted", src
    )
    program = check_source(allowed, "demo.flp")
    raw = [f for f in program.flows if f.tensor == "impressions.sparse"]
    assert [(f.kind, f.src, f.dst) for f in raw] == [("data", "media.trainer", "shop.trainer")]
    assert not [f for f in program.flows if f.tensor == "grad(impressions.sparse)"]


def test_active_party_column_sent_to_passive_party() -> None:
    src = mutate(
        "at media: act1 = mlp(embed(impressions.sparse, buckets: 101, dim: 4), units: [16])",
        "at media: act1 = mlp(embed(conversions.sparse, buckets: 101, dim: 4), units: [16])",
    )
    errors = _errors(src)
    assert errors[0] == (
        "raw feature column `shop.conversions.sparse` would be sent to `media` without an allow rule: "
        "shop.conversions.sparse → media (no allow rule)"
    )
    # Even where allowed, a vertical cut only flows to the label owner.
    allowed = mutate(
        "  at_rest encrypted", "  allow shop -> media: conversions.sparse\n  at_rest encrypted", src
    )
    assert _errors(allowed)[0] == (
        "in a vertical pipeline tensors go to the label owner `shop`; "
        "`conversions.sparse` would go from `shop` to `media`"
    )


def test_declared_shape_mismatch() -> None:
    assert _errors(mutate("float32[batch, 16]", "float32[batch, 8]")) == [
        "declared `float32[batch, 8]` for `act1` but it is inferred as `float32[batch, 16]`"
    ]
    assert _errors(mutate("float32[batch, 16]", "int64[batch, 16]")) == [
        "declared `int64[batch, 16]` for `act1` but it is inferred as `float32[batch, 16]`"
    ]


def test_unused_allow_rule_is_a_warning() -> None:
    src = mutate("  at_rest encrypted", "  allow shop -> media: act2\n  at_rest encrypted")
    program = check_source(src, "demo.flp")
    assert [w.message for w in program.warnings] == [
        "allow rule is not used by any flow: `allow shop -> media: act2`"
    ]
    assert program.warnings[0].severity == "warning" and program.warnings[0].line == 41


def test_flows_carry_the_rule_that_allows_them() -> None:
    program = check_source(BASE, "demo.flp")
    by_tensor = {f.tensor: f for f in program.flows if f.kind in ("activation", "gradient")}
    assert by_tensor["act1"].rule == "allow media -> shop: act1"
    assert by_tensor["act1"].rule_span == "demo.flp:39:3"
    assert by_tensor["grad(act1)"].rule == "allow shop -> media: grad(act1)"
    # 32 x 16 float32 = 2 KiB of payload + header allowance, rounded up to KiB.
    assert by_tensor["act1"].max_bytes == 2048 + 4096
    assert by_tensor["act1"].spec is not None and by_tensor["act1"].spec.shape == [None, 16]


def test_horizontal_without_weights_rule(tmp_path: Path) -> None:
    src = (PIPELINES / "horizontal_dlrm.flp").read_text().replace("  allow hub -> bank: weights\n", "")
    f = tmp_path / "h.flp"
    f.write_text(src)
    with pytest.raises(FldslError) as ei:
        check(f)
    msgs = [d.message for d in ei.value.errors]
    assert len(msgs) == 4  # one per bank
    assert msgs[0] == (
        "information flow: `weights` would carry `bank2.clicks.label` to `bank1`: "
        "bank2.clicks.label → loss → gradients → hub.ps aggregate → weights → bank1 (no allow rule)"
    )


def test_distributed_shard_needs_rule(tmp_path: Path) -> None:
    src = (PIPELINES / "distributed_dlrm.flp").read_text().replace("  allow owner -> cloud: shard\n", "")
    f = tmp_path / "d.flp"
    f.write_text(src)
    with pytest.raises(FldslError) as ei:
        check(f)
    assert [d.message for d in ei.value.errors] == [
        "information flow: `shard` would carry `owner.clicks.label` to `cloud`: "
        "owner.clicks.label → shard → cloud (no allow rule)"
        for _ in range(2)
    ]


def test_node_level_rule_only_allows_that_node(tmp_path: Path) -> None:
    src = (
        (PIPELINES / "horizontal_dlrm.flp")
        .read_text()
        .replace("allow bank -> hub: gradients", "allow bank -> hub.ps: gradients")
    )
    f = tmp_path / "h.flp"
    f.write_text(src)
    assert check(f).scenario == "horizontal"
    f.write_text(src.replace("allow bank -> hub.ps: gradients", "allow bank2 -> hub.ps: gradients"))
    with pytest.raises(FldslError) as ei:
        check(f)
    assert len(ei.value.errors) == 3  # bank1, bank3, bank4 have no rule


def test_error_carries_partial_program_and_violations() -> None:
    from fldsl.api import task_graph

    with pytest.raises(FldslError) as ei:
        check_source(mutate("  allow shop -> media: grad(act1)\n", ""), "demo.flp")
    e = ei.value
    assert e.violations == [
        {
            "src": "shop.trainer",
            "dst": "media.trainer",
            "tensor": "grad(act1)",
            "message": e.errors[0].message,
        }
    ]
    assert e.program is not None
    assert "shop.trainer->media.trainer:grad(act1)" not in {f.id for f in e.program.flows}
    g = task_graph(e.program)
    assert g.has_edge("media.trainer/send:act1", "shop.trainer/recv:act1")
    assert "demo.flp:25:3: error: information flow" in e.render()
