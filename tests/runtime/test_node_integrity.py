"""A node refuses to start when its measured files differ from what the manifest lists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildkit

from fldsl.artifacts import node_dir
from fldsl.runtime.node import EXIT_TRUST, NodeError, check_artifacts, listed_hashes


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return buildkit.vertical_build(tmp_path_factory.mktemp("b"))


def test_untouched_build_passes_and_returns_manifest(build: Path) -> None:
    ndir = node_dir(build, "media.trainer")
    data = check_artifacts(ndir)
    assert set(listed_hashes(data.decode(), ndir)) >= {"plan.json", "policy.json"}


@pytest.mark.parametrize("name", ["plan.json", "policy.json"])
def test_modified_file_is_refused(tmp_path: Path, name: str) -> None:
    build = buildkit.vertical_build(tmp_path)
    f = node_dir(build, "media.trainer") / name
    doc = json.loads(f.read_text())
    doc["pipeline"] = "tampered"
    f.write_text(json.dumps(doc))
    with pytest.raises(NodeError) as e:
        check_artifacts(f.parent)
    assert e.value.code == EXIT_TRUST
    assert f"{name} was modified after compile" in str(e.value)


def test_missing_manifest_or_unlisted_file_is_refused(tmp_path: Path) -> None:
    build = buildkit.vertical_build(tmp_path)
    ndir = node_dir(build, "shop.trainer")
    toml = next(ndir.glob("*.manifest.toml"))
    toml.write_text(toml.read_text().replace("file:node/policy.json", "file:node/other.json"))
    with pytest.raises(NodeError, match=r"policy\.json is not among the trusted files"):
        check_artifacts(ndir)
    toml.unlink()
    with pytest.raises(NodeError, match="expected one rendered manifest"):
        check_artifacts(ndir)
