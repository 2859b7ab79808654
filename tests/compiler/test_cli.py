"""`fldsl check` / `fldsl compile` from the command line: output, exit codes, no tracebacks."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from fldsl.cli import main

from ._base import mutate

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def test_check_ok() -> None:
    r = CliRunner().invoke(main, ["check", str(PIPELINES / "vertical_wide_deep.flp")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ok: vertical_wide_deep — 2 parties, 2 nodes, 7 flows")


def test_check_prints_caret_and_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.flp"
    f.write_text(mutate("at media: act1", "at medai: act1"))
    r = CliRunner().invoke(main, ["check", str(f)])
    assert r.exit_code == 2
    assert f"{f}:22:6: error: unknown party `medai`; did you mean `media`?" in r.output
    assert "  22 |   at medai: act1" in r.output
    assert "     |      ^~~~~" in r.output
    assert "Traceback" not in r.output
    assert isinstance(r.exception, SystemExit)


def test_check_syntax_error_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.flp"
    f.write_bytes(b"pipeline p\nparty { \xff")
    r = CliRunner().invoke(main, ["check", str(f)])
    assert r.exit_code == 2 and "not UTF-8 text" in r.output
    r = CliRunner().invoke(main, ["check", str(tmp_path / "nope.flp")])
    assert r.exit_code == 2 and "file not found" in r.output
    f.write_text("pipeline p\nparty {")
    r = CliRunner().invoke(main, ["check", str(f)])
    assert r.exit_code == 2 and f"{f}:2:7: error: unexpected `{{`; expected a party name" in r.output


def test_set_errors(tmp_path: Path) -> None:
    flp = str(PIPELINES / "vertical_wide_deep.flp")
    r = CliRunner().invoke(main, ["check", flp, "--set", "row=5"])
    assert r.exit_code == 2 and "--set row=5: unknown parameter `row`; did you mean `rows`?" in r.output
    r = CliRunner().invoke(main, ["check", flp, "--set", "rows=many"])
    assert (
        r.exit_code == 2 and "--set rows=many: `many` is not an integer (parameter `rows` is int)" in r.output
    )
    r = CliRunner().invoke(main, ["check", flp, "--set", "rows"])
    assert r.exit_code == 2 and "--set expects NAME=VALUE" in r.output


def test_warning_is_printed_but_check_passes(tmp_path: Path) -> None:
    f = tmp_path / "w.flp"
    f.write_text(mutate("  at_rest encrypted", "  allow shop -> media: act2\n  at_rest encrypted"))
    r = CliRunner().invoke(main, ["check", str(f)])
    assert r.exit_code == 0
    assert "warning: allow rule is not used by any flow: `allow shop -> media: act2`" in r.output


def test_compile_prints_digest_and_files(tmp_path: Path) -> None:
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["compile", str(PIPELINES / "horizontal_dlrm.flp"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"compiled {out}  digest " in r.output
    assert "nodes/hub.ps/" in r.output and "nodes/bank4.worker/" in r.output
    assert (out / "nodes/bank3.worker/plan.json").is_file()


def test_compile_target(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        main,
        ["compile", str(PIPELINES / "vertical_wide_deep.flp"), "-o", str(tmp_path), "--target", "compose"],
    )
    assert r.exit_code == 0, r.output
    assert "deploy/compose/media/  addresses.json compose.yaml" in r.output
    assert "deploy/compose/shop/  addresses.json compose.yaml" in r.output
    r = CliRunner().invoke(
        main, ["compile", str(PIPELINES / "vertical_wide_deep.flp"), "-o", str(tmp_path), "--target", "nomad"]
    )
    assert r.exit_code == 2 and "Invalid value for '--target'" in r.output


def test_compile_sign_with_bad_key_is_an_input_error(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    r = CliRunner().invoke(
        main,
        ["compile", str(PIPELINES / "vertical_wide_deep.flp"), "-o", str(tmp_path / "b"), "--sign", str(key)],
    )
    assert r.exit_code in (2, 4), r.output
    assert r.output.count("error: --sign:") == 1 and "Traceback" not in r.output
