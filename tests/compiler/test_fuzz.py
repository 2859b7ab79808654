"""Random and mutated sources produce diagnostics (FldslError), never another exception."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fldsl.api import check_source
from fldsl.diagnostics import FldslError, render

from ._base import BASE

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
SOURCES = [BASE] + [
    (PIPELINES / f"{n}.flp").read_text()
    for n in ("vertical_wide_deep", "horizontal_dlrm", "distributed_dlrm")
]
TOKENS = sorted(
    {
        t
        for src in SOURCES
        for t in re.findall(r'"[^"\n]*"|[A-Za-z_][A-Za-z0-9_]*|-?\d+(?:\.\d+)?|->|\.\.|\S', src)
    }
    | {
        "",
        "0",
        "-1",
        "99999999999999999999",
        "1e999",
        "none",
        "true",
        "grad",
        "${x}",
        '"{i}"',
        "§",
        "\t",
        "\n",
    }
)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(src: str) -> None:
    try:
        check_source(src, "fuzz.flp")
    except FldslError as e:
        assert e.errors, "FldslError without an error diagnostic"
        text = render(e.diagnostics, {"fuzz.flp": src})
        assert "fuzz.flp" in text or "<input>" in text


@SETTINGS
@given(
    st.text(
        alphabet=st.sampled_from(list('pipelinepartynodedata{}[]()<>:,.="#-\n 0123456789_xyz')), max_size=200
    )
)
def test_random_text(src: str) -> None:
    _check(src)


@SETTINGS
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_random_token_soup(tokens: list[str]) -> None:
    _check("pipeline fuzz\n" + " ".join(tokens))


@st.composite
def mutated(draw: st.DrawFn) -> str:
    src = draw(st.sampled_from(SOURCES))
    toks = re.findall(r'"[^"\n]*"|[A-Za-z_][A-Za-z0-9_]*|-?\d+(?:\.\d+)?|->|\.\.|\s+|\S', src)
    for _ in range(draw(st.integers(1, 4))):
        if not toks:
            break
        i = draw(st.integers(0, len(toks) - 1))
        op = draw(st.sampled_from(["delete", "replace", "duplicate", "swap", "insert"]))
        if op == "delete":
            del toks[i]
        elif op == "replace":
            toks[i] = draw(st.sampled_from(TOKENS))
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "insert":
            toks.insert(i, " " + draw(st.sampled_from(TOKENS)) + " ")
        else:
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
    return "".join(toks)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_pipelines(src: str) -> None:
    _check(src)


def test_deep_nesting_is_a_diagnostic_not_a_crash() -> None:
    import pytest

    for src in (
        "pipeline p\nmodel { x = " + "f(" * 3000 + ")" * 3000 + " }",
        "pipeline p\ntrain { epochs: 1" + "+1" * 5000 + " }",
        "pipeline p\ntrain { epochs: " + "[" * 3000 + "]" * 3000 + " }",
    ):
        with pytest.raises(FldslError) as ei:
            check_source(src, "deep.flp")
        assert ei.value.errors[0].message == "expression nested too deeply (more than 200 levels)"
