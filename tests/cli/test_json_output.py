"""``--json`` on every ``fldsl`` command: one JSON document on stdout, errors included, same exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fldsl.cli import EXIT_INPUT, EXIT_OK, main

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
FLP = str(PIPELINES / "vertical_wide_deep.flp")


def _invoke(*args: str) -> tuple[int, dict]:
    # mix_stderr is gone in click 8.2: stdout is what a JSON reader sees.
    r = CliRunner().invoke(main, list(args))
    assert "Traceback" not in r.stdout
    return r.exit_code, json.loads(r.stdout)


def _leaf_commands() -> list[tuple[str, ...]]:
    ctx = click.Context(main)
    out: list[tuple[str, ...]] = []
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        assert cmd is not None
        subs = cmd.commands if isinstance(cmd, click.Group) else {"": cmd}
        out += [tuple(w for w in (name, sub) if w) for sub in subs]
    return out


@pytest.mark.parametrize("words", _leaf_commands(), ids=" ".join)
def test_every_command_accepts_json(words: tuple[str, ...]) -> None:
    ctx = click.Context(main)
    cmd = main.get_command(ctx, words[0])
    for w in words[1:]:
        assert isinstance(cmd, click.Group)
        cmd = cmd.get_command(ctx, w)
    assert cmd is not None
    assert any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option)), words


def test_check_json_ok() -> None:
    code, doc = _invoke("check", FLP, "--json")
    assert code == EXIT_OK
    assert doc["command"] == "check" and doc["ok"] is True and doc["exit_code"] == 0
    assert doc["pipeline"] == "vertical_wide_deep" and doc["parties"] == ["media", "shop"]
    assert doc["flows"] == 7 and doc["warnings"] == []


def test_check_json_diagnostic_is_an_object(tmp_path: Path) -> None:
    f = tmp_path / "bad.flp"
    text = Path(FLP).read_text().replace("at media: act1", "at medai: act1")
    f.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("  at medai: act1"))
    code, doc = _invoke("check", str(f), "--json")
    assert code == EXIT_INPUT and doc["ok"] is False and doc["exit_code"] == EXIT_INPUT
    d = doc["diagnostics"][0]
    assert (d["file"], d["line"], d["column"], d["severity"]) == (str(f), line, 6, "error")
    assert d["message"] == "unknown party `medai`; did you mean `media`?"
    assert "hint" in d and "medai" in doc["error"]["message"]


def test_compile_json_ok_and_error(tmp_path: Path) -> None:
    code, doc = _invoke("compile", FLP, "-o", str(tmp_path / "b"), "--json")
    assert code == EXIT_OK and doc["command"] == "compile"
    assert doc["build_dir"] == str(tmp_path / "b") and len(doc["digest"]) == 64
    assert doc["nodes"] == ["media.trainer", "shop.trainer"] and "pipeline.json" in doc["files"]
    bad = tmp_path / "bad.flp"
    bad.write_text("pipeline p\nparty {")
    code, doc = _invoke("compile", str(bad), "--json")
    assert code == EXIT_INPUT and doc["diagnostics"][0]["line"] == 2
    assert doc["diagnostics"][0]["message"] == "unexpected `{`; expected a party name"


def test_run_json_compile_error_is_reported(tmp_path: Path) -> None:
    """It printed nothing on stdout before: the diagnostics went to stderr as text."""
    bad = tmp_path / "bad.flp"
    bad.write_text("pipeline p\nparty {")
    code, doc = _invoke("run", str(bad), "--json")
    assert code == EXIT_INPUT and doc["command"] == "run" and doc["ok"] is False
    assert doc["diagnostics"][0]["file"] == str(bad)


def test_usage_error_under_json(tmp_path: Path) -> None:
    code, doc = _invoke("check", FLP, "--set", "rows", "--json")
    assert code == EXIT_INPUT and "--set expects NAME=VALUE" in doc["error"]["message"]
    code, doc = _invoke("compile", FLP, "--bogus", "--json")
    assert code == EXIT_INPUT and "--bogus" in doc["error"]["message"]


def test_text_command_wrapped_under_json(tmp_path: Path) -> None:
    """A command without a result shape of its own: its lines, its exit code."""
    code, doc = _invoke("trust", "init", "--party", "media", "--trust-dir", str(tmp_path), "--json")
    assert code == EXIT_OK and doc["command"] == "trust init" and doc["ok"] is True
    assert any(line.startswith("fingerprint: ") for line in doc["output"])
    code, doc = _invoke("trust", "show", "--party", "nobody", "--trust-dir", str(tmp_path / "none"), "--json")
    assert code != EXIT_OK and doc["ok"] is False and doc["error"]["message"]


def test_json_after_double_dash_is_an_argument() -> None:
    r = CliRunner().invoke(main, ["check", "--", "--json"])
    assert r.exit_code == EXIT_INPUT and not r.stdout.lstrip().startswith("{")
