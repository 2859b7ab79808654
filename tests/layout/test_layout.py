"""The source tree's fldsl/* links, the installs and the measured code: one code digest however installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fldsl import measurement

ROOT = Path(__file__).resolve().parents[2]
LINKS = {"compiler": "compiler", "runtime": "runtime", "stdlib": "stdlib", "grammar": "grammar",
         "pipelines": "pipelines", "bench": "benchkit"}


def test_fldsl_links_point_at_the_top_level_folders() -> None:
    for name, folder in LINKS.items():
        link = ROOT / "fldsl" / name
        assert link.is_symlink() and os.readlink(link) == f"../{folder}", link
        assert link.resolve() == (ROOT / folder).resolve()


def _tree(base: Path, wheel: bool) -> list[tuple[str, Path]]:
    """fldsl's packages laid out as a wheel installs them (sub-packages inside fldsl/) or as a checkout has
    them (siblings, linked from fldsl/), with the bench beside them."""
    files = {"fldsl": ["__init__.py", "api.py"], "compiler": ["__init__.py", "parse.py"],
             "runtime": ["__init__.py", "node.py"], "bench": ["__init__.py", "harness.py"]}
    dirs: list[tuple[str, Path]] = []
    for pkg, names in files.items():
        d = base / "fldsl" if pkg == "fldsl" else (base / "fldsl" / pkg if wheel else base / pkg)
        d.mkdir(parents=True, exist_ok=True)
        for n in names:
            (d / n).write_text(f"# {pkg}/{n}\n")
        if not wheel and pkg != "fldsl":
            (base / "fldsl" / pkg).symlink_to(f"../{pkg}")
        if pkg != "bench":  # not a measured package
            dirs.append(("fldsl" if pkg == "fldsl" else f"fldsl.{pkg}", d))
    return dirs


def test_code_digest_is_the_same_for_a_wheel_and_a_checkout(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    digests = []
    for wheel in (True, False):
        dirs = _tree(tmp_path / ("wheel" if wheel else "checkout"), wheel)
        monkeypatch.setattr(measurement, "_package_dirs", lambda dirs=dirs: dirs)
        measurement.code_digest.cache_clear()
        digests.append(measurement.code_digest())
    measurement.code_digest.cache_clear()
    assert digests[0] == digests[1]


def test_code_digest_leaves_the_bench_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = _tree(tmp_path, wheel=True)
    monkeypatch.setattr(measurement, "_package_dirs", lambda: dirs)
    measurement.code_digest.cache_clear()
    before = measurement.code_digest()
    (tmp_path / "fldsl" / "bench" / "harness.py").write_text("# changed\n")
    measurement.code_digest.cache_clear()
    assert measurement.code_digest() == before
    (tmp_path / "fldsl" / "compiler" / "parse.py").write_text("# changed\n")
    measurement.code_digest.cache_clear()
    assert measurement.code_digest() != before
    measurement.code_digest.cache_clear()


def test_the_enclave_trusts_fldsl_files_where_python_imports_them() -> None:
    """A checkout imports fldsl.runtime through the fldsl/runtime link; Gramine checks the path opened, so
    the probe lists that path (it listed the link's target, and the node could not import inside)."""
    import fldsl.compiler.parse
    import fldsl.runtime.node
    from fldsl.compiler.enclave_probe import fldsl_files

    files, roots = fldsl_files()
    for mod in (fldsl.runtime.node, fldsl.compiler.parse):
        assert os.path.abspath(str(mod.__file__)) in files
    assert os.path.dirname(os.path.abspath(str(fldsl.runtime.node.__file__))) in roots
