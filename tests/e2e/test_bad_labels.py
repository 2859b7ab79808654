"""A label outside the loss's classes (issue #11): refused by the label owner when it reads its data, before
alignment and training, naming every row as file:line:column; `fldsl run` exits 2 (input error) with the
message in its summary and no traceback. Before, the node died inside TensorFlow (exit 1, "internal error",
no row named), or a sigmoid loss trained on the bad labels without a word."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import buildkit
import pytest

from fldsl.measurement import code_digest

pytestmark = pytest.mark.e2e

FLDSL = [sys.executable, "-c", "import sys; from fldsl.cli import main; sys.exit(main())"]
SHOP = "shop.trainer"


def _run(root: Path, labels: dict[int, str], **kw: object) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`fldsl run BUILD` as a user types it; built again if the checkout's code changed meanwhile (the
    simulated measurement covers it)."""
    for attempt in range(3):
        before = code_digest.__wrapped__()
        build = buildkit.vertical_csv_build(root / f"try{attempt}", labels, **kw)  # type: ignore[arg-type]
        out = subprocess.run([*FLDSL, "run", str(build), "--trust-dir", str(root / "trust")], cwd=root,
                             capture_output=True, text=True, timeout=240,
                             env=dict(os.environ, COLUMNS="3000"))  # the message on one line
        if out.returncode != 3 or code_digest.__wrapped__() == before:
            break
    return out, root / f"try{attempt}" / "data" / "conversions.csv"


def _check(out: subprocess.CompletedProcess[str], csv: Path, want: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-4000:]
    assert "Traceback" not in text and "internal error" not in text, text[-4000:]
    failed = re.search(rf"node {SHOP} failed: (.*)", out.stdout)
    assert failed, out.stdout[-4000:]
    assert failed.group(1) == want, failed.group(1)


def test_binary_labels_other_than_0_and_1_are_refused_by_row(tmp_path: Path) -> None:
    out, csv = _run(tmp_path, {1: "2", 4: "-1", 7: "0.5"}, loss="sigmoid_cross_entropy")
    _check(out, csv, f"{csv}: label column `y` (column 2) must hold 0 or 1 (a binary task: loss "
                     f"sigmoid_cross_entropy); 3 rows are not: {csv}:3:2 ('2'), {csv}:6:2 ('-1'), "
                     f"{csv}:9:2 ('0.5')")


def test_a_class_index_equal_to_the_logits_width_is_refused(tmp_path: Path) -> None:
    out, csv = _run(tmp_path, {10: "3"}, classes=3)
    _check(out, csv, f"{csv}: label column `y` (column 2) must hold a whole number in [0, 3) (3 classes: "
                     "loss softmax_cross_entropy over logits `logits` of width 3); 1 row is not: "
                     f"{csv}:12:2 ('3')")
