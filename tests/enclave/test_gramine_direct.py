"""Every node inside Gramine (``gramine-direct``), signed by the real tools, over real attested gRPC.

What a Gramine engineer would check before calling a Python + TensorFlow enclave shippable: it starts, it
learns exactly what the same pipeline learns without an enclave, Gramine refuses code that changed after
signing (and the user is told which file), and a peer refuses a node whose manifest was altered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from enclavekit import REPO, fldsl, holdout, node_failures, run_json, sign

pytestmark = [pytest.mark.gramine, pytest.mark.slow, pytest.mark.e2e]

DEMO = REPO / "pipelines" / "vertical_wide_deep.flp"

HORIZONTAL = """\
pipeline enclave_horizontal

use std.models.{dlrm}

party bank[1..2] "a bank" {
  node worker
  data clicks = criteo(rows: 1200, seed: 3, part: i - 1, parts: 2, buckets: 100)
}

party hub "the aggregator" {
  node ps
}

partition horizontal over bank aggregate at hub.ps every step

model {
  logits = dlrm(clicks.dense, clicks.sparse, buckets: 100, embedding_dim: 4, bottom: [16, 4], top: [16, 2])
  loss softmax_cross_entropy(logits, clicks.label)
}

train {
  epochs: 1
  batch_size: 64
  optimizer: adam(learning_rate: 0.003)
  seed: 2
  metrics: [loss, auc]
  validation: 0.2
}

trust {
  enclave sgx(enclave_size: "4G", max_threads: 64, isv_prod_id: 3, isv_svn: 1)
  attestation sim
  allow bank -> hub: gradients
  allow hub -> bank: weights
  at_rest encrypted
}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("enclave")


@pytest.fixture(scope="module")
def signed_demo(work: Path) -> Path:
    build = work / "signed" / "vertical_wide_deep"
    sign(DEMO, build, work)
    return build


def _decrypt(path: str, node: str, cwd: Path, out: Path) -> list[np.ndarray]:
    proc = fldsl("model", "decrypt", path, "-o", str(out), "--node", node, "--name", f"{node}/model", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as npz:
        return [npz[k] for k in sorted(npz.files)]


def test_vertical_demo_in_gramine_direct_learns_what_it_learns_without_an_enclave(work: Path,
                                                                                  signed_demo: Path) -> None:
    code, native, err = run_json(str(DEMO), cwd=work)
    assert code == 0, err + node_failures(native)
    code, inside, err = run_json(str(signed_demo), "--enclave", "gramine-direct", cwd=work)
    assert code == 0, err + node_failures(inside)
    assert inside["enclave"] == "gramine-direct"
    for node, n in inside["nodes"].items():
        # Inside the LibOS there is no /dev/attestation: the node says so, and that its quote is simulated.
        assert n["attestation"] == {"backend": "sim", "simulated": True, "runner": "gramine"}, node
        assert n["steps"] == native["nodes"][node]["steps"] > 0
    assert holdout(inside, "shop.trainer") == pytest.approx(holdout(native, "shop.trainer"), abs=1e-9)
    # The sealed models land on the host, under the run directory, and are the same weights.
    run_dir = Path(inside["run_dir"])
    for node in ("media.trainer", "shop.trainer"):
        enclave_model = inside["nodes"][node]["exports"][f"{node}/model"]
        assert Path(enclave_model).is_relative_to(run_dir) and Path(enclave_model).is_file()
        a = _decrypt(enclave_model, node, work, work / f"{node}-enclave.npz")
        native_model = native["nodes"][node]["exports"][f"{node}/model"]
        b = _decrypt(native_model, node, work, work / f"{node}-native.npz")
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_a_signed_build_runs_only_inside_and_an_unsigned_one_only_outside(work: Path,
                                                                         signed_demo: Path) -> None:
    code, _doc, err = run_json(str(signed_demo), cwd=work)
    assert code == 2 and "signed for Gramine" in err and "--enclave gramine-direct" in err
    unsigned = work / "unsigned"
    proc = fldsl("compile", str(DEMO), "-o", str(unsigned), cwd=work)
    assert proc.returncode == 0, proc.stderr
    code, _doc, err = run_json(str(unsigned), "--enclave", "gramine-direct", cwd=work)
    assert code == 2 and "not signed" in err and "--sign" in err
    assert "Traceback" not in err


def test_a_peer_refuses_a_node_whose_manifest_was_altered(work: Path, signed_demo: Path) -> None:
    build = work / "altered"
    shutil.copytree(signed_demo, build, symlinks=True)
    manifest = build / "nodes" / "media.trainer" / "trainer.manifest"
    text = manifest.read_text()
    # A host that changes what the enclave runs (here one environment value) without re-signing.
    assert 'TF_CPP_MIN_LOG_LEVEL = "2"' in text
    manifest.write_text(text.replace('TF_CPP_MIN_LOG_LEVEL = "2"', 'TF_CPP_MIN_LOG_LEVEL = "0"'))
    code, doc, err = run_json(str(build), "--enclave", "gramine-direct", cwd=work, timeout=600)
    assert code == 3, err + node_failures(doc)
    errors = " ".join(str(n["error"]) for n in doc["nodes"].values())
    assert "mr_enclave" in errors, errors
    assert all(n["steps"] == 0 for n in doc["nodes"].values())


def _venv_with_fldsl_installed(root: Path) -> Path:
    """A venv with fldsl installed the regular way (not editable) from a copy of this checkout, the rest of
    the runtime taken from this environment: its files are the test's own to change."""
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "tests", "runs", "build", ".fldsl", "__pycache__", "*.egg-info", "bench"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (site / "runtime-deps.pth").write_text(f"{deps}\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True)
    return venv / "bin" / "python3"


def test_a_trusted_file_changed_after_signing_is_named_and_gramine_refuses_it(work: Path) -> None:
    from fldsl.runtime.launcher import Launcher

    python = _venv_with_fldsl_installed(work / "installed")
    build = work / "installed" / "build"
    # The demo in a 2G enclave: signing measures every page of the enclave, so this signs in a fraction of
    # the 16G demo's time; what is tested does not depend on the size.
    small = work / "installed" / "vertical_small.flp"
    small.write_text(DEMO.read_text().replace('enclave_size: "16G"', 'enclave_size: "2G"'))
    sign(small, build, work, "--entrypoint", str(python))
    ops = next(python.parent.parent.glob("lib/python3*/site-packages/fldsl/stdlib/tf/ops.py"))
    assert str(ops) in (build / "nodes" / "shop.trainer" / "trainer.manifest").read_text()
    with ops.open("a") as f:
        f.write("\n# changed after signing\n")
    # fldsl run checks every trusted file before starting and names the one that changed.
    code, _doc, err = run_json(str(build), "--enclave", "gramine-direct", cwd=work)
    assert code == 3 and str(ops) in err and "changed since the build was signed" in err, err
    # Without that check, Gramine itself refuses the file: no node gets to train.
    run_dir = work / "installed" / "run"
    run_dir.mkdir()
    launcher = Launcher(build, run_dir=run_dir, trust_dir=work / ".fldsl" / "trust", enclave="gramine-direct")
    launcher.start()
    code, _ = launcher.wait()
    assert code != 0
    assert all(st.step == 0 and st.exit_code != 0 for st in launcher.nodes.values())


def test_horizontal_ps_and_two_workers_in_gramine_direct(work: Path) -> None:
    flp = work / "enclave_horizontal.flp"
    flp.write_text(HORIZONTAL)
    code, native, err = run_json(str(flp), cwd=work)
    assert code == 0, err + node_failures(native)
    build = work / "signed" / "enclave_horizontal"
    sign(flp, build, work)
    code, inside, err = run_json(str(build), "--enclave", "gramine-direct", cwd=work)
    assert code == 0, err + node_failures(inside)
    assert set(inside["nodes"]) == {"bank1.worker", "bank2.worker", "hub.ps"}
    for node in ("bank1.worker", "bank2.worker"):
        assert inside["nodes"][node]["attestation"]["runner"] == "gramine"
        assert holdout(inside, node) == pytest.approx(holdout(native, node), abs=1e-6)
        assert inside["nodes"][node]["bytes_sent"][f"{node}->hub.ps:gradients"] > 0
    assert "hub.ps/model" in inside["nodes"]["hub.ps"]["exports"]
    # The enclaves' files are the signed ones and nothing else: the manifest pins every file it trusts.
    doc = json.loads((build / "pipeline.json").read_text())
    assert {n["measurement_kind"] for n in doc["nodes"]} == {"sgx"}
