"""Malformed programs: each yields a diagnostic at an exact line and column with an exact message."""

from __future__ import annotations

import pytest

from fldsl.api import check_source
from fldsl.diagnostics import FldslError

from ._base import BASE, mutate

# (id, old, new, line, column, message)
CASES = [
    ("keyword-typo", "pipeline demo", "pipelin demo", 1, 1, "unexpected `pipelin`; expected `pipeline`"),
    (
        "party-without-name",
        'party media "passive" {',
        'party "passive" {',
        7,
        7,
        'unexpected string "passive"; expected a party name',
    ),
    (
        "node-without-name",
        "  node trainer\n  data impressions",
        "  node\n  data impressions",
        9,
        8,
        "unexpected `impressions`; expected `[`, `data`, `node` or `}`",
    ),
    (
        "missing-paren",
        "units: [16])\n  at shop:  act2",
        "units: [16]\n  at shop:  act2",
        23,
        3,
        "unexpected `at`; expected `)` or `,`",
    ),
    (
        "unterminated-string",
        'side: "follower"',
        'side: "follower',
        9,
        61,
        "unterminated string (strings are one line, in double quotes)",
    ),
    ("at-without-colon", "  at media: act1", "  at media act1", 22, 12, "unexpected `act1`; expected `:`"),
    (
        "arrow-typo",
        "allow media -> shop: act1 as",
        "allow media => shop: act1 as",
        39,
        15,
        "unexpected `=`; expected `,`, `->` or `.`",
    ),
    (
        "missing-brace",
        "features: 8)\n}\n\nparty shop",
        "features: 8)\n\n\nparty shop",
        12,
        1,
        "unexpected `party`; expected `data`, `node`, `{` or `}`",
    ),
    (
        "attestation-without-mode",
        "attestation sim",
        "attestation",
        39,
        9,
        "unexpected `media`; expected `allow`, `at_rest`, `attestation`, `enclave` or `}`",
    ),
    (
        "extra-paren",
        "dim: 4), units: [16])\n  at shop:  act2",
        "dim: 4), units: [16]))\n  at shop:  act2",
        22,
        85,
        "unexpected `)`; expected a name, `at`, `loss` or `}`",
    ),
    (
        "partition-kind",
        "partition vertical",
        "partition vertcal",
        17,
        11,
        "unexpected `vertcal`; expected `distributed`, `horizontal` or `vertical`",
    ),
    (
        "bad-range",
        'party media "passive"',
        'party media[2..1] "passive"',
        7,
        12,
        "invalid range [2..1] (need 0 <= low <= high, at most 256)",
    ),
    (
        "unknown-party-at",
        "at media: act1",
        "at medai: act1",
        22,
        6,
        "unknown party `medai`; did you mean `media`?",
    ),
    (
        "unknown-tensor",
        "dense(concat(act2, act1)",
        "dense(concat(act2, act3)",
        24,
        41,
        "unknown tensor `act3`; did you mean `act2`?",
    ),
    (
        "unknown-dataset",
        "embed(impressions.sparse",
        "embed(impresions.sparse",
        22,
        30,
        "unknown data set `impresions`; did you mean `impressions`?",
    ),
    (
        "unknown-field",
        "embed(impressions.sparse",
        "embed(impressions.spars",
        22,
        42,
        "data set `impressions` has no field `spars`; did you mean `sparse`?",
    ),
    (
        "unknown-op",
        "mlp(embed(impressions",
        "mpl(embed(impressions",
        22,
        20,
        "unknown op `mpl`; did you mean `mlp`?",
    ),
    (
        "unknown-op-param",
        "units: [8, 2]",
        "unit: [8, 2]",
        24,
        48,
        "`dense(...)` has no parameter `unit`; did you mean `units`?",
    ),
    (
        "op-not-imported",
        "use std.models.{embed, mlp, dense, concat}",
        "use std.models.{embed, mlp, concat}",
        24,
        22,
        "op `dense` is not imported",
    ),
    (
        "unknown-module",
        "use std.models",
        "use std.model",
        5,
        5,
        "unknown module `std.model`; did you mean `std.models`?",
    ),
    (
        "unknown-loss",
        "softmax_cross_entropy",
        "softmax_crossentropy",
        25,
        8,
        "unknown loss `softmax_crossentropy`; did you mean `softmax_cross_entropy`?",
    ),
    (
        "unknown-train-key",
        "epochs: 1",
        "epoch: 1",
        29,
        3,
        "unknown train setting `epoch`; did you mean `epochs`?",
    ),
    ("zero-batch", "batch_size: 32", "batch_size: 0", 30, 15, "`batch_size` must be positive, got 0"),
    ("unknown-optimizer", "adam(", "adma(", 31, 14, "unknown optimizer `adma`; did you mean `adam`?"),
    ("unknown-attestation", "attestation sim", "attestation sgx", 38, 15, "unknown attestation mode `sgx`"),
    (
        "unknown-at-rest",
        "at_rest encrypted",
        "at_rest encrypt",
        41,
        11,
        "unknown at_rest mode `encrypt`; did you mean `encrypted`?",
    ),
    (
        "allow-unknown-party",
        "allow shop -> media: grad(act1)",
        "allow shp -> media: grad(act1)",
        40,
        9,
        "unknown party `shp`; did you mean `shop`?",
    ),
    (
        "allow-unknown-tensor",
        "allow media -> shop: act1 as",
        "allow media -> shop: act9 as",
        39,
        24,
        "unknown tensor `act9`; did you mean `act2`?",
    ),
    (
        "declared-shape-mismatch",
        "float32[batch, 16]",
        "float32[batch, 32]",
        39,
        32,
        "declared `float32[batch, 32]` for `act1` but it is inferred as `float32[batch, 16]`",
    ),
    (
        "unknown-dtype",
        "float32[batch, 16]",
        "flaot32[batch, 16]",
        39,
        32,
        "unknown dtype `flaot32`; did you mean `float32`?",
    ),
    (
        "unknown-param-ref",
        'rows: rows, seed: 7, side: "follower"',
        'rows: rowz, seed: 7, side: "follower"',
        9,
        40,
        "unknown parameter `rowz`; did you mean `rows`?",
    ),
    (
        "bad-choice",
        'side: "follower"',
        'side: "folower"',
        9,
        61,
        "`side` of `wide_n_deep(...)` cannot be `folower`; did you mean `follower`?",
    ),
    (
        "param-type",
        "param rows: int = 200",
        "param rows: integer = 200",
        3,
        13,
        "unknown parameter type `integer`; did you mean `int`?",
    ),
    (
        "param-default-type",
        "param rows: int = 200",
        'param rows: int = "x"',
        3,
        19,
        "default of `rows` must be an integer, got a string",
    ),
    (
        "align-key",
        "on example_id",
        "on id",
        18,
        9,
        "`media.impressions` has id column `example_id`, not `id`",
    ),
    ("align-method", "using psi.ecdh", "using psi.rsa", 18, 65, "unknown alignment method `psi.rsa`"),
    (
        "vertical-needs-at",
        "  at shop:  act2",
        "  act2",
        23,
        3,
        "in a vertical pipeline every model statement says where it runs",
    ),
    (
        "validation-range",
        "validation: 0.2",
        "validation: 1.5",
        33,
        15,
        "`validation` is a held-out fraction in (0, 1), got 1.5",
    ),
    (
        "pipeline-range",
        "validation: 0.2",
        "validation: 0.2\n  pipeline: 2",
        34,
        13,
        "`pipeline` is 0 (lock-step) or 1 (one step ahead), got 2",
    ),
    (
        "pipeline-not-int",
        "validation: 0.2",
        "validation: 0.2\n  pipeline: 0.5",
        34,
        13,
        "`pipeline` must be an integer, got a number",
    ),
    (
        "pipeline-typo",
        "validation: 0.2",
        "validation: 0.2\n  pipelines: 1",
        34,
        3,
        "unknown train setting `pipelines`; did you mean `pipeline`?",
    ),
    (
        "tensor-twice",
        "dim: 4), units: [16])\n  at shop:  logits",
        "dim: 4), units: [16])\n  at shop:  act1 = mlp(act2, units: [4])\n  at shop:  logits",
        24,
        13,
        "tensor `act1` is defined twice",
    ),
    (
        "loss-label-field",
        "softmax_cross_entropy(logits, conversions.label)",
        "softmax_cross_entropy(logits, conversions.sparse)",
        25,
        38,
        "`conversions.sparse` is not a label field (use `conversions.label`)",
    ),
    (
        "softmax-one-class",
        "units: [8, 2]",
        "units: [8, 1]",
        25,
        8,
        "softmax_cross_entropy needs logits [batch, C] with C >= 2, got float32[batch, 1]",
    ),
    (
        "unknown-reader",
        'wide_n_deep(rows: rows, seed: 7, side: "leader"',
        'wide_n_dep(rows: rows, seed: 7, side: "leader"',
        14,
        22,
        "unknown data reader `wide_n_dep`; did you mean `wide_n_deep`?",
    ),
    (
        "node-twice",
        "  node trainer\n  data conversions",
        "  node trainer\n  node trainer\n  data conversions",
        14,
        8,
        "node `trainer` is declared twice in party `shop`",
    ),
    (
        "param-twice",
        "buckets: 101, dim: 4), units: [16])\n  at shop:  act2",
        "buckets: 101, dim: 4, dim: 5), units: [16])\n  at shop:  act2",
        22,
        72,
        "parameter `dim` of `embed(...)` is given twice",
    ),
    (
        "enclave-kind",
        "enclave sgx(",
        "enclave sgz(",
        37,
        11,
        "unknown enclave kind `sgz`; did you mean `sgx`?",
    ),
    (
        "enclave-param-type",
        "max_threads: 64",
        'max_threads: "64"',
        37,
        48,
        "`max_threads` of `sgx(...)` must be an integer, got a string",
    ),
    (
        "embed-of-floats",
        "mlp(embed(conversions.sparse, buckets: 101, dim: 4), units: [16])",
        "mlp(embed(act1, buckets: 101, dim: 4), units: [16])",
        23,
        24,
        "`embed`: embed input `x` must hold integer ids, got float32[batch, 16]",
    ),
    (
        "enclave-size",
        'enclave_size: "8G"',
        'enclave_size: "12G"',
        37,
        15,
        '`enclave_size` must be a power of two such as "8G" or "512M", got "12G"',
    ),
    (
        "enclave-threads",
        "max_threads: 64",
        "max_threads: 0",
        37,
        35,
        "`max_threads` must be in 1..4096, got 0",
    ),
    (
        "brace-in-string-index",
        'side: "leader"',
        'side: "leader{i}"',
        14,
        61,
        "`{i}` is only defined inside a party family such as `party bank[1..4]`",
    ),
]


def _first_error(src: str) -> tuple[int | None, int | None, str]:
    with pytest.raises(FldslError) as ei:
        check_source(src, "demo.flp")
    d = ei.value.errors[0]
    return d.line, d.column, d.message


def test_base_is_valid() -> None:
    program = check_source(BASE, "demo.flp")
    assert program.scenario == "vertical"
    assert not program.warnings


@pytest.mark.parametrize(
    ("old", "new", "line", "column", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed(old: str, new: str, line: int, column: int, message: str) -> None:
    assert _first_error(mutate(old, new)) == (line, column, message)


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize(
    ("src", "line", "column", "message"),
    [
        ("", 1, 1, "unexpected end of file; expected `pipeline`"),
        ("pipeline", 1, 9, "unexpected end of file; expected a pipeline name"),
        ("pipeline p\nparty a {", 2, 10, "unexpected end of file; expected `data`, `node` or `}`"),
        (
            "pipeline p\n\nparty a { node n }\nmodel { at a: x = mlp(a.b, units: [1 2]) }",
            4,
            38,
            "unexpected number `2`; expected `*`, `+`, `,`, `-` or `]`",
        ),
        (
            "pipeline p\nparty a { node n } §",
            2,
            20,
            "unexpected character `§`; expected `model`, `param`, "
            "`partition`, `party`, `train`, `trust` or `use`",
        ),
    ],
)
def test_syntax_edges(src: str, line: int, column: int, message: str) -> None:
    assert _first_error(src) == (line, column, message)


def test_misspelt_keyword_gets_a_hint() -> None:
    with pytest.raises(FldslError) as ei:
        check_source("pipeline p\npartys a { node n }", "x.flp")
    d = ei.value.errors[0]
    assert (d.line, d.column, d.end_column) == (2, 1, 7)
    assert d.message.startswith("unexpected `partys`; expected `model`, `param`, `partition`, `party`")
    assert d.hint == "did you mean `party`?"


def test_keywords_are_names_where_no_keyword_fits() -> None:
    src = mutate("data conversions", "data train").replace("conversions.", "train.")
    src = src.replace("shop.conversions", "shop.train")
    program = check_source(src, "demo.flp")
    assert program.loss.label == "train.label"
    assert program.train.metrics == ["loss", "auc"]


def test_several_semantic_errors_in_one_run() -> None:
    src = mutate("epochs: 1", "epoch: 1", mutate("attestation sim", "attestation sgx"))
    with pytest.raises(FldslError) as ei:
        check_source(src, "demo.flp")
    messages = [d.message for d in ei.value.errors]
    assert "unknown train setting `epoch`; did you mean `epochs`?" in messages
    assert "unknown attestation mode `sgx`" in messages
    assert "the train block needs `epochs`" in messages


def test_rendered_diagnostic_has_caret_and_location() -> None:
    with pytest.raises(FldslError) as ei:
        check_source(mutate("at media: act1", "at medai: act1"), "demo.flp")
    text = str(ei.value)
    assert "demo.flp:22:6: error: unknown party `medai`; did you mean `media`?" in text
    assert "  22 |   at medai: act1 = mlp(" in text
    assert "     |      ^~~~~" in text
