"""CSV data into Gramine enclaves the way a deployment does it, end to end, through the real CLI.

Each party encrypts its CSV with its own key (``fldsl data encrypt``) and serves the key with ``fldsl keys
serve``; ``fldsl run --enclave gramine-direct --data-dir --key-service`` starts the signed nodes, which
attest, fetch their key, install it for Gramine's encrypted mount and read ``/fldsl/data/<name>``. The
model learns exactly what the same pipeline learns from the plain files without an enclave. A key service
that does not grant the node its key, or serves another key, stops the run as a trust failure (exit 3)
that says why.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from enclavekit import FLDSL, fldsl, node_failures, run_json

pytestmark = [
    pytest.mark.gramine, pytest.mark.slow, pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("gramine-direct") is None or shutil.which("gramine-sgx-pf-crypt") is None,
                       reason="Gramine is not installed (gramine-direct / gramine-sgx-pf-crypt not on PATH)"),
]

GUEST, HOST = "guest.trainer", "host.trainer"

PIPELINE = """\
pipeline gramine_csv

param data_dir: path = "plain"

use std.models.{mlp, dense, concat}

party guest "holds the label and two features" {
  node trainer
  data patients = csv("${data_dir}/guest.csv", id: id, label: y, columns: ["x*"])
}

party host "holds three other features of the same patients" {
  node trainer
  data records = csv("${data_dir}/host.csv", id: id, columns: ["x*"])
}

partition vertical {
  align guest.patients, host.records on id using psi.ecdh
}

model {
  at host:  act_host = mlp(records.features, units: [8])
  at guest: act_guest = mlp(patients.features, units: [8])
  at guest: logits = dense(concat(act_guest, act_host), units: [8, 2])
  loss softmax_cross_entropy(logits, patients.label)
}

train {
  epochs: 2
  batch_size: 32
  optimizer: adam(learning_rate: 0.01)
  seed: 0
  metrics: [loss, auc]
  validation: 0.2
}

trust {
  enclave sgx(enclave_size: "4G", max_threads: 64, isv_prod_id: 7, isv_svn: 1)
  attestation sim
  allow host -> guest: act_host as float32[batch, 8]
  allow guest -> host: grad(act_host)
  at_rest encrypted
}
"""


def write_csvs(folder: Path) -> None:
    """400 patients; the label depends on both parties' features. The host also has 40 rows the guest
    lacks and lists its rows in another order (PSI aligns them)."""
    rng = np.random.default_rng(11)
    n = 400
    g = rng.normal(size=(n, 2))
    h = rng.normal(size=(n + 40, 3))
    y = (g[:, 0] - 0.8 * h[:n, 0] + 0.6 * h[:n, 1] + 0.3 * rng.normal(size=n) > 0).astype(int)
    folder.mkdir()
    (folder / "guest.csv").write_text("id,y,x0,x1\n" + "".join(
        f"p{i},{y[i]},{g[i, 0]:.6f},{g[i, 1]:.6f}\n" for i in range(n)))
    order = rng.permutation(n + 40)
    (folder / "host.csv").write_text("id,x0,x1,x2\n" + "".join(
        f"p{i},{h[i, 0]:.6f},{h[i, 1]:.6f},{h[i, 2]:.6f}\n" for i in order))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plain CSVs, a signed build, and each party's key and encrypted file (enc/<party>/<name>)."""
    work = tmp_path_factory.mktemp("gramine_data")
    write_csvs(work / "plain")
    (work / "gramine_csv.flp").write_text(PIPELINE)
    # Each party's trust folder, each pinning the other's public identity, as two organisations would.
    sign = ("--sign", ".fldsl/trust/guest/enclave_signing.key")
    for args in (("trust", "init", "--party", "guest"), ("trust", "init", "--party", "host"),
                 ("trust", "add-peer", ".fldsl/trust/host/identity.json", "--party", "guest"),
                 ("trust", "add-peer", ".fldsl/trust/guest/identity.json", "--party", "host"),
                 ("compile", "gramine_csv.flp", "-o", "signed", *sign)):
        proc = fldsl(*args, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for party in ("guest", "host", "other"):
        proc = fldsl("data", "keygen", f"{party}.key", cwd=work)
        assert proc.returncode == 0, proc.stderr
    for party in ("guest", "host"):
        (work / "enc" / party).mkdir(parents=True)
        proc = fldsl("data", "encrypt", f"plain/{party}.csv", "--key", f"{party}.key", "-o", f"enc/{party}/",
                     cwd=work)
        assert proc.returncode == 0, proc.stderr
        assert f"/fldsl/data/{party}.csv" in proc.stdout
        encrypted = (work / "enc" / party / f"{party}.csv").read_bytes()
        assert b"p1," not in encrypted  # no plaintext row on the host
    return work


@contextlib.contextmanager
def key_service(work: Path, name: str, key: str, grant: str) -> Iterator[tuple[str, Path]]:
    """``fldsl keys serve`` as a process on a free loopback port: (address, its log file)."""
    log = work / f"keys-{name}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [FLDSL, "keys", "serve", "signed", "--key", f"data={key}", "--grant", f"data={grant}",
             "--listen", "127.0.0.1:0", "--trust-dir", ".fldsl/trust"],
            cwd=work, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "key service listening on HOST:PORT (...)", or EOF if it failed
        assert first.startswith("key service listening on "), first + log.read_text()
        yield first.split()[4], log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def enclave_run(work: Path, guest_service: str, host_service: str) -> tuple[int, dict[str, Any], str]:
    return run_json("signed", "--enclave", "gramine-direct",
                    "--data-dir", f"{GUEST}=enc/guest", "--data-dir", f"{HOST}=enc/host",
                    "--key-service", f"{GUEST}={guest_service}", "--key-service", f"{HOST}={host_service}",
                    cwd=work)


def test_encrypted_csv_in_gramine_direct_learns_what_the_plain_files_teach(deployment: Path) -> None:
    work = deployment
    code, plain, err = run_json("gramine_csv.flp", cwd=work)
    assert code == 0, err + node_failures(plain)
    with key_service(work, "guest", "guest.key", GUEST) as (g_addr, g_log), \
            key_service(work, "host", "host.key", HOST) as (h_addr, h_log):
        code, inside, err = enclave_run(work, g_addr, h_addr)
    assert code == 0, err + node_failures(inside)
    assert "Traceback" not in err
    for node, n in inside["nodes"].items():
        assert n["attestation"]["runner"] == "gramine", node
        assert n["steps"] == plain["nodes"][node]["steps"] > 0
    auc = float(inside["nodes"][GUEST]["metrics"]["auc"])
    assert auc == pytest.approx(float(plain["nodes"][GUEST]["metrics"]["auc"]), abs=1e-6)
    assert auc > 0.8  # the signal is learnable: a broken read would not get here
    # Each service released its key once, to its own node, and logged no key material.
    for log, node, key in ((g_log, GUEST, "guest.key"), (h_log, HOST, "host.key")):
        text = log.read_text()
        assert f"granted key data to {node}" in text, text
        secret = (work / key).read_bytes()
        assert secret.hex() not in text and secret.hex().upper() not in text
    addresses = json.loads((Path(inside["run_dir"]) / "addresses.json").read_text())
    assert addresses[GUEST]["key_service"] == g_addr and addresses[HOST]["key_service"] == h_addr


def test_a_key_service_that_refuses_or_serves_another_key_stops_the_run_as_a_trust_failure(
        deployment: Path) -> None:
    work = deployment
    # The host's owner grants its key to the guest's node only: the host node is refused, naming the grant.
    with key_service(work, "guest2", "guest.key", GUEST) as (g_addr, _), \
            key_service(work, "host2", "host.key", GUEST) as (h_addr, h_log):
        code, doc, err = enclave_run(work, g_addr, h_addr)
    assert code == 3, err + node_failures(doc)
    error = str(doc["nodes"][HOST]["error"])
    assert "refused key `data`" in error and "not granted to host.trainer" in error, error
    assert "refused key data to host.trainer: field grant" in h_log.read_text()
    assert all(n["steps"] == 0 for n in doc["nodes"].values())
    # A service that answers with another key: the node installs it, and Gramine's integrity check of the
    # encrypted file fails; the node names the file instead of training on anything.
    with key_service(work, "guest3", "guest.key", GUEST) as (g_addr, _), \
            key_service(work, "host3", "other.key", HOST) as (h_addr, _):
        code, doc, err = enclave_run(work, g_addr, h_addr)
    assert code == 3, err + node_failures(doc)
    error = str(doc["nodes"][HOST]["error"])
    assert "/fldsl/data/host.csv" in error and "integrity check" in error, error
    assert "Traceback" not in error and "\n" not in error
    assert all(n["steps"] == 0 for n in doc["nodes"].values())
