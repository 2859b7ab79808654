"""`fldsl data keygen` and `fldsl data encrypt` (Gramine protected files via gramine-sgx-pf-crypt)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from fldsl.cli import EXIT_ENV, EXIT_INPUT, EXIT_OK, main

PF_CRYPT = shutil.which("gramine-sgx-pf-crypt")


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_keygen_writes_16_private_bytes_once(tmp_path: Path) -> None:
    key = tmp_path / "data.key"
    res = run("data", "keygen", str(key))
    assert res.exit_code == EXIT_OK, res.output
    assert len(key.read_bytes()) == 16 and stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    again = run("data", "keygen", str(key))
    assert again.exit_code == EXIT_INPUT and "already exists" in again.output and key.read_bytes() == before
    (tmp_path / "link.key").symlink_to(tmp_path / "target.key")  # a dangling link: must not be followed
    res = run("data", "keygen", str(tmp_path / "link.key"))
    assert res.exit_code == EXIT_INPUT and not (tmp_path / "target.key").exists()
    assert run("data", "keygen", str(tmp_path / "no" / "dir.key")).exit_code == EXIT_INPUT


@pytest.mark.skipif(PF_CRYPT is None, reason="gramine-sgx-pf-crypt (Gramine) is not installed")
def test_encrypt_round_trips_through_gramine_pf_crypt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    monkeypatch.chdir(tmp_path)  # Gramine embeds the output path as given: use the mount's relative path
    (tmp_path / "data").mkdir()
    plain = tmp_path / "train.csv"
    plain.write_text("example_id,x1,label\n" + "".join(f"{i},{i * 0.5},{i % 2}\n" for i in range(5000)))
    assert run("data", "keygen", "data.key").exit_code == EXIT_OK
    res = run("data", "encrypt", str(plain), "-o", "data/train.csv", "--key", "data.key")
    assert res.exit_code == EXIT_OK, res.output
    enc = (tmp_path / "data" / "train.csv").read_bytes()
    assert b"example_id" not in enc and len(enc) >= plain.stat().st_size
    assert PF_CRYPT is not None
    back = subprocess.run([PF_CRYPT, "decrypt", "-w", "data.key", "-i", "data/train.csv", "-o", "back.csv"],
                          capture_output=True, text=True, check=False)
    assert back.returncode == 0, back.stdout + back.stderr
    assert (tmp_path / "back.csv").read_bytes() == plain.read_bytes()

    (tmp_path / "other.key").write_bytes(bytes(16))
    wrong = subprocess.run([PF_CRYPT, "decrypt", "-w", "other.key", "-i", "data/train.csv", "-o", "x.csv"],
                           capture_output=True, text=True, check=False)
    assert wrong.returncode != 0  # only the data key opens it
    again = run("data", "encrypt", str(plain), "-o", "data/train.csv", "--key", "data.key")
    assert again.exit_code == EXIT_INPUT and "already exists" in again.output


@pytest.mark.skipif(PF_CRYPT is None, reason="gramine-sgx-pf-crypt (Gramine) is not installed")
def test_encrypt_into_a_folder_keeps_the_name_the_node_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    # From anywhere: the file is bound to data/<name>, the path the node's mount opens it by
    # (tests/enclave/test_gramine_data.py proves that inside gramine-direct).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "enc").mkdir(parents=True)
    plain = tmp_path / "train.csv"
    plain.write_text("id,x,y\n1,0.5,1\n")
    (tmp_path / "k").write_bytes(bytes(range(16)))
    res = run("data", "encrypt", str(plain), "--key", "k", "-o", "owner/enc/")
    assert res.exit_code == EXIT_OK, res.output
    assert "/fldsl/data/train.csv" in res.output
    assert (tmp_path / "owner" / "enc" / "train.csv").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "owner", "train.csv"]  # no scratch left
    res = run("data", "encrypt", str(plain), "--key", "k", "-o", "missing/dir/train.csv")
    assert res.exit_code == EXIT_INPUT and "no such folder" in res.output


def test_encrypt_input_errors_and_missing_tool(tmp_path: Path) -> None:
    plain = tmp_path / "p.csv"
    plain.write_text("a\n")
    key = tmp_path / "k"
    key.write_bytes(bytes(16))
    res = run("data", "encrypt", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o"), "--key", str(key))
    assert res.exit_code == EXIT_INPUT and "no such file" in res.output
    (tmp_path / "long").write_bytes(bytes(32))
    res = run("data", "encrypt", str(plain), "-o", str(tmp_path / "o"), "--key", str(tmp_path / "long"))
    assert res.exit_code == EXIT_INPUT and "holds 32 bytes" in res.output
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    res = run("data", "encrypt", str(plain), "-o", str(tmp_path / "o"), "--key", str(key),
              env={"PATH": str(empty_path)})
    assert res.exit_code == EXIT_ENV and "gramine-sgx-pf-crypt not found" in res.output
    assert not (tmp_path / "o").exists()
