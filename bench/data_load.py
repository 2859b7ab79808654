"""Loading a Criteo-layout data set at one node: the pyarrow readers vs the exact Python reader (issue #12).

    python bench/data_load.py --rows 5000000 [--old-rows 500000] [--formats csv,parquet] [--json]

Writes one file per format into a temp folder (or ``--dir``): ``id``, ``label``, 13 integer dense columns
``I1..I13`` and 26 categorical columns ``C1..C26`` of 8 hex digits (the layout of Criteo's display-ads
logs: 40 columns and an id), with empty cells where Criteo has them (about 4 % of dense and 3 % of
categorical cells). Declared as the node would declare it::

    data clicks = csv(path, id: id, label: label) {
      rows <= ROWS
      integer  I1, ..., I13   missing: mean
      category C1, ..., C26   hash: 1000 buckets
    }

Each load runs in a fresh process and does what a node does when it starts: ``check_schemas`` (the schema
check before PSI) then ``load_dataset`` with the binary label rule. Reported per load: wall seconds, peak
RSS (``ru_maxrss``, which counts Arrow's buffers; tracemalloc does not) and its growth over the RSS before
the load, against the bytes of the arrays ``load_dataset`` returned. The old reader (``engine="python"``,
the node's sequence before the pyarrow readers: ``check_csv_schema`` then the exact reader) needs tens of
GB at 5M rows, so it reads the first ``--old-rows`` rows (its time is linear in the rows; the report
scales it up and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DENSE, SPARSE = 13, 26
CHUNK = 500_000  # rows generated and written at a time: bounded memory whatever --rows is
TARGET_S, TARGET_RATIO = 20.0, 2.0  # issue #12: 5M rows load in <= 20 s, peak <= 2x the arrays


def schema_spec(path: Path, rows: int, reader: str = "csv") -> Any:
    """The DataSpec a node's plan carries for the file (what the compiler makes of the block above)."""
    from fldsl.artifacts import ColumnSpec, DataSpec, MissingSpec, TensorSpec

    dense = [ColumnSpec(name=f"I{i}", type="integer", missing=MissingSpec(fill="mean"))
             for i in range(1, DENSE + 1)]
    sparse = [ColumnSpec(name=f"C{i}", type="category", hash_buckets=1000) for i in range(1, SPARSE + 1)]
    columns = dense + sparse
    width = sum(c.width for c in columns)
    return DataSpec(name="clicks", reader=reader, path=str(path), id_column="id", label_column="label",  # type: ignore[arg-type]
                    feature_columns=[c.name for c in columns],
                    fields={"features": TensorSpec(shape=[None, width], dtype="float32"),
                            "label": TensorSpec(shape=[None], dtype="int64")},
                    columns=columns, max_rows=rows)


# ---------------------------------------------------------------------------------------------------------
# Generating the file (vectorised numpy, written by pyarrow: seconds per million rows)
# ---------------------------------------------------------------------------------------------------------

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex8(values: np.ndarray) -> np.ndarray:
    """uint32 values as 8 lowercase hex digits, one row of bytes per value (Criteo's hashed categories)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    return _HEX[(values[:, None] >> shifts) & 0xF]


def _chunk(start: int, n: int, seed: int) -> Any:
    import pyarrow as pa

    rng = np.random.default_rng([seed, start])
    cols: dict[str, pa.Array] = {"id": pa.array(np.arange(start, start + n, dtype=np.int64))}
    dense = np.floor(np.expm1(rng.exponential(1.6, (n, DENSE)))).astype(np.int64)
    logit = (np.log1p(dense) - 1.5) @ rng.normal(0, 0.3, DENSE) - 1.0
    ranks = (rng.zipf(1.3, (n, SPARSE)) % 50_000).astype(np.uint32)
    logit += np.where(ranks[:, :5] < 3, 0.5, -0.1).sum(axis=1)
    cols["label"] = pa.array((rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64))
    for j in range(DENSE):
        cols[f"I{j + 1}"] = pa.array(dense[:, j], mask=rng.random(n) < 0.04)
    offsets = pa.py_buffer(np.arange(0, 8 * n + 1, 8, dtype=np.int32))
    for j in range(SPARSE):
        hashed = (ranks[:, j] * np.uint32(2654435761) + np.uint32(j)).astype(np.uint32)
        text = pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(_hex8(hashed).tobytes())])
        cols[f"C{j + 1}"] = pc_mask(text, rng.random(n) < 0.03)
    return pa.table(cols)


def pc_mask(text: Any, missing: np.ndarray) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.if_else(pa.array(missing), pa.scalar(None, pa.string()), text)


def generate(folder: Path, rows: int, formats: list[str], seed: int = 7) -> dict[str, Path]:
    """Write the file in each format (csv: empty cells for nulls; parquet: nulls); returns the paths."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    paths = {f: folder / f"criteo_{rows}.{f}" for f in formats}
    first = _chunk(0, min(rows, CHUNK), seed)
    writers: dict[str, Any] = {}
    if "csv" in paths:
        writers["csv"] = pacsv.CSVWriter(paths["csv"], first.schema,
                                         write_options=pacsv.WriteOptions(quoting_style="none"))
    if "parquet" in paths:
        writers["parquet"] = pq.ParquetWriter(paths["parquet"], first.schema)
    start, table = 0, first
    while True:
        for w in writers.values():
            w.write_table(table)
        start += table.num_rows
        if start >= rows:
            break
        table = _chunk(start, min(rows - start, CHUNK), seed)
    for w in writers.values():
        w.close()
    return paths


# ---------------------------------------------------------------------------------------------------------
# One load, in its own process
# ---------------------------------------------------------------------------------------------------------


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover - not Linux


def load_once(path: Path, reader: str, engine: str, rows: int) -> dict[str, Any]:
    """What a node does at start: the schema check, then load_dataset. Run in a fresh process."""
    from fldsl.runtime.csvschema import check_csv_schema, check_schemas
    from fldsl.runtime.data import LabelRule, load_dataset

    spec = schema_spec(path, rows, reader)
    rule = LabelRule(2, "binary task: loss softmax_cross_entropy")
    before = _rss_now()
    t0 = time.perf_counter()
    if engine == "python":
        check_csv_schema(spec, path)  # the node's start-up check before this change
    else:
        check_schemas([spec])
    table = load_dataset(spec, label_rule=rule, engine=engine)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    arrays = table.ids.nbytes + sum(a.nbytes for a in table.fields.values()) + \
        sum(a.nbytes for a in table.raw.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prepare = _prepare_seconds(spec, table)
    return {"reader": reader, "engine": engine, "rows": len(table), "seconds": round(seconds, 2),
            "prepare_seconds": prepare,
            "peak_rss": peak, "rss_before": before, "array_bytes": arrays,
            "peak_over_arrays": round(peak / arrays, 2),
            "growth_over_arrays": round((peak - before) / arrays, 2)}


def _prepare_seconds(spec: Any, table: Any) -> float:
    """What the node does next, outside the load's figures: fit the declared preprocessing on 80 % of the
    rows (means of the integer columns; nothing to fit for hashed categories) and compute every row's
    category index (the bucket of each cell; the Arrow readers keep categories as Arrow strings, so this
    is where they are dictionary-encoded and each distinct value hashed once). The one-hot matrix itself
    (5M x 26,013 floats here) is not built: a model this wide would embed the indices instead."""
    from fldsl.runtime import preprocess

    t0 = time.perf_counter()
    train = np.arange(len(table) * 4 // 5, dtype=np.int64)
    fitted = preprocess.fit(spec, table.raw, train)
    for e in fitted["columns"]:
        if e["type"] == "category":
            preprocess.category_positions(e, table.raw[e["name"]])
    return round(time.perf_counter() - t0, 2)


def _child(path: Path, reader: str, engine: str, rows: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), reader, engine, str(rows)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load of {path} ({engine}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(rows: int, old_rows: int, formats: list[str], folder: Path, reuse: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    existing = {f: folder / f"criteo_{rows}.{f}" for f in formats}
    if reuse and all(p.exists() for p in existing.values()):
        paths = existing  # written by an earlier run with the same --rows (the generator is deterministic)
    else:
        paths = generate(folder, rows, formats)
    gen_s = time.perf_counter() - t0
    results = [_child(p, f, "arrow", rows) for f, p in paths.items()]
    if "csv" in formats and old_rows > 0:
        n = min(old_rows, rows)
        old_path = paths["csv"] if n == rows else generate(folder, n, ["csv"])["csv"]
        old = _child(old_path, "csv", "python", n)
        old["scaled_seconds"] = round(old["seconds"] * rows / n, 1)
        results.append(old)
    return {"rows": rows, "generate_s": round(gen_s, 1),
            "file_bytes": {f: p.stat().st_size for f, p in paths.items()}, "loads": results,
            "cpus": os.cpu_count()}


def _report(r: dict[str, Any]) -> str:
    mib = 1 << 20
    files = ", ".join(f"{k} {v / mib:,.0f} MiB" for k, v in r["file_bytes"].items())
    lines = [f"{r['rows']:,} rows x 40 columns + id, generated in {r['generate_s']} s ({files}), "
             f"{r['cpus']} CPUs",
             f"{'reader':8} {'engine':7} {'rows':>10} {'seconds':>8} {'peak RSS':>10} {'arrays':>10} "
             f"{'peak/arr':>8} {'growth/arr':>10} {'then fit+index s':>16}"]
    for x in r["loads"]:
        scaled = f"  (x{r['rows'] / x['rows']:.0f} rows: ~{x['scaled_seconds']} s)" if "scaled_seconds" in x \
            and x["rows"] != r["rows"] else ""
        lines.append(f"{x['reader']:8} {x['engine']:7} {x['rows']:>10,} {x['seconds']:>8} "
                     f"{x['peak_rss'] / mib:>7,.0f} MiB {x['array_bytes'] / mib:>6,.0f} MiB "
                     f"{x['peak_over_arrays']:>8} {x['growth_over_arrays']:>10} "
                     f"{x['prepare_seconds']:>16}{scaled}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--old-rows", type=int, default=500_000,
                    help="rows the exact Python reader reads (0: skip)")
    ap.add_argument("--formats", default="csv,parquet")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to write the files (default: a temp folder)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="with --dir: reuse files an earlier run wrote there for the same --rows")
    ap.add_argument("--child", nargs=4, metavar=("PATH", "READER", "ENGINE", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        path, reader, engine, rows = a.child
        print(json.dumps(load_once(Path(path), reader, engine, int(rows))))
        return 0
    formats = [f for f in a.formats.split(",") if f]
    if a.dir is not None:
        a.dir.mkdir(parents=True, exist_ok=True)
        result = run(a.rows, a.old_rows, formats, a.dir, reuse=a.reuse)
    else:
        with tempfile.TemporaryDirectory(prefix="fldsl-data-load-") as tmp:
            result = run(a.rows, a.old_rows, formats, Path(tmp))
    print(json.dumps(result, indent=2) if a.json else _report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
