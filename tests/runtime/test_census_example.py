"""The shipped census example (pipelines/census_vertical.flp, shown in the README): it compiles with no data,
and on raw files as a census export looks (empty cells, "?" for unknown, text categories, unscaled numbers)
it learns from the raw files alone, with every transform in the pipeline (roles in one process over
in-memory links)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import memlink

from fldsl.api import compile_pipeline

ROOT = Path(__file__).resolve().parents[2]
FLP = ROOT / "pipelines" / "census_vertical.flp"
ROWS = 1200


def _write_raw(d: Path) -> None:
    """The label depends on columns of both parties; a tenth of the cells are unknown."""
    rng = np.random.default_rng(11)
    age = rng.integers(17, 90, ROWS)
    hours = rng.normal(40, 10, ROWS).round(1)
    gain = np.where(rng.random(ROWS) < 0.1, rng.integers(1000, 99999, ROWS), 0)
    work = rng.choice(["Private", "Self-emp", "Federal-gov", "Local-gov"], ROWS)
    occ = rng.choice(["Exec-managerial", "Craft-repair", "Sales", "Tech-support", "Other-service"], ROWS)
    edu_num = rng.integers(1, 17, ROWS)
    edu = np.array(["Bachelors" if e >= 13 else "HS-grad" if e >= 9 else "Some-school" for e in edu_num])
    married = rng.choice(["Married-civ-spouse", "Never-married", "Divorced"], ROWS)
    country = rng.choice(["United-States", "Mexico", "India", "Germany", "?"], ROWS,
                         p=[.8, .08, .05, .04, .03])
    score = (0.04 * (age - 40) + 0.05 * (hours - 40) + 0.3 * (edu_num - 9)
             + 1.2 * (married == "Married-civ-spouse") + 0.8 * (occ == "Exec-managerial") + 1.5 * (gain > 0)
             + rng.normal(0, 1, ROWS))
    y = (score > np.quantile(score, 0.7)).astype(int)

    def unknown(values: np.ndarray, token: str) -> list[str]:
        return [token if rng.random() < 0.1 else str(v) for v in values]

    d.mkdir()
    a, h = unknown(age, "?"), unknown(hours, "?")
    g = ["" if rng.random() < 0.05 else str(v) for v in gain]
    w, o = unknown(work, "?"), unknown(occ, "?")
    (d / "bank.csv").write_text("id,income,age,hours-per-week,capital-gain,workclass,occupation\n" + "".join(
        f"p{i},{y[i]},{a[i]},{h[i]},{g[i]},{w[i]},{o[i]}\n" for i in range(ROWS)))
    kids = ["" if rng.random() < 0.1 else str(k) for k in rng.integers(0, 5, ROWS)]
    rel = np.where(married == "Married-civ-spouse", "Husband", "Not-in-family")
    order = rng.permutation(ROWS)[: ROWS - 100]  # the office knows most, not all, of the bank's people
    (d / "office.csv").write_text(
        "id,education-num,children,education,marital-status,relationship,native-country\n" + "".join(
            f"p{i},{edu_num[i]},{kids[i]},{edu[i]},{married[i]},{rel[i]},{country[i]}\n" for i in order))


def test_the_census_example_compiles_without_data(tmp_path: Path) -> None:
    build = compile_pipeline(FLP, tmp_path / "build")
    again = compile_pipeline(FLP, tmp_path / "again")
    assert build.digest == again.digest


@pytest.mark.slow
def test_the_census_example_learns_from_raw_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the declared paths (data/...) are the nodes' working folder's
    _write_raw(tmp_path / "data")
    build = compile_pipeline(FLP, tmp_path / "build").build_dir
    res = memlink.run_in_threads(build, tmp_path / "run", timeout=240)
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    auc = res["bank.trainer"]["metrics"]["auc"]
    assert auc > 0.8, res["bank.trainer"]["metrics"]  # the signal is strong; unscaled or unfilled it diverges


def test_the_readme_shows_the_shipped_census_blocks() -> None:
    readme = (ROOT / "README.md").read_text()
    shipped = FLP.read_text()
    start = shipped.index('party bank "holds income')
    end = shipped.index("partition vertical")
    assert shipped[start:end].strip() in readme
