"""Trust failures end to end: each is refused by the peers, named, and the run exits 3."""

from __future__ import annotations

import json
from pathlib import Path

import buildkit
import pytest
from conftest import describe, launch

from fldsl.artifacts import node_dir

pytestmark = pytest.mark.e2e


def _errors(res) -> str:
    return "\n".join(f"{n}: {st.error}" for n, st in res.nodes.items() if st.error)


def test_plan_changed_after_compile_is_refused_by_the_peer(tmp_path: Path, trust_dir: Path) -> None:
    def make() -> Path:
        build = buildkit.vertical_build(tmp_path, rows=200, epochs=1)
        # The host edits the passive's plan (a bigger learning rate) and re-renders its manifest so the node
        # itself starts; the pins are unchanged, so the new measurement no longer matches.
        plan = node_dir(build, "media.trainer") / "plan.json"
        doc = json.loads(plan.read_text())
        doc["train"]["optimizer"]["params"]["learning_rate"] = 0.5
        plan.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
        buildkit.rehash_manifest(build, "media.trainer")
        return build

    res = launch(make, tmp_path / "run", trust_dir)
    assert res.exit_code == 3, describe(res)
    errors = _errors(res)
    assert "mr_enclave" in errors and "media.trainer" in errors, errors
    assert res.nodes["media.trainer"].exit_code == 3


def test_plan_changed_without_rehash_refuses_to_start(tmp_path: Path, trust_dir: Path) -> None:
    def make() -> Path:
        build = buildkit.vertical_build(tmp_path, rows=200, epochs=1)
        plan = node_dir(build, "shop.trainer") / "plan.json"
        plan.write_text(plan.read_text().replace('"epochs": 1', '"epochs": 9'))
        return build

    res = launch(make, tmp_path / "run", trust_dir)
    assert res.exit_code == 3, describe(res)
    assert "plan.json was modified after compile" in (res.nodes["shop.trainer"].error or "")


def _run_media_with(tmp_path: Path, trust_dir: Path, media_folder: Path) -> str:
    """Run the vertical demo with media.trainer quoting from ``media_folder``; shop's folder is genuine.
    Returns the errors, after asserting the run ended as a trust failure."""
    # Anyone can make a certificate whose quote does not verify, so a refusal does not end the run at once:
    # the nodes retry until the connect deadline and then report the trust failure. A short deadline keeps
    # the test short.
    deadline = ["--connect-timeout", "10"]
    node_args = {"media.trainer": ["--trust-dir", str(media_folder), *deadline], "shop.trainer": deadline}
    res = launch(lambda: buildkit.vertical_build(tmp_path, rows=200, epochs=1), tmp_path / "run", trust_dir,
                 node_args=node_args)
    assert res.exit_code == 3, describe(res)
    return _errors(res)


def test_sim_quote_from_another_deployment_root_is_refused(tmp_path: Path, trust_dir: Path) -> None:
    from fldsl.runtime.attestation.parties import add_peer, init_party, load_identity
    from fldsl.runtime.launcher import ensure_trust

    ensure_trust(trust_dir, ["media.trainer", "shop.trainer"])
    # A media folder of another deployment that even pins shop's genuine identity: shop pins media's real one.
    init_party(tmp_path / "other-trust", "media")
    add_peer(tmp_path / "other-trust" / "media", load_identity(trust_dir / "shop" / "identity.json"))
    errors = _run_media_with(tmp_path, trust_dir, tmp_path / "other-trust" / "media")
    assert "shop.trainer" in errors and "quote" in errors and "party media's simulated root" in errors, errors


def test_a_party_cannot_quote_for_another_partys_node(tmp_path: Path, trust_dir: Path) -> None:
    """Shop's host holds shop's keys only. It starts its own "media.trainer" (to be sent media's half of
    training) from a copy of shop's folder whose identity.json claims party media: every local check passes,
    but shop's quotes chain to shop's root, and media's genuine peers pin media's root for media's nodes."""
    import shutil

    from fldsl.runtime.attestation.parties import PartyIdentity, load_identity
    from fldsl.runtime.launcher import ensure_trust

    ensure_trust(trust_dir, ["media.trainer", "shop.trainer"])
    shop = trust_dir / "shop"
    forged = tmp_path / "forged" / "media"
    shutil.copytree(shop, forged)
    shop_ident = load_identity(shop / "identity.json")
    (forged / "identity.json").unlink()
    (forged / "identity.json").write_bytes(PartyIdentity(
        party="media", sim_root_ca=shop_ident.sim_root_ca, sim_mr_signer=shop_ident.sim_mr_signer).dump())
    (forged / "peers" / "media.json").unlink()
    shutil.copy(shop / "identity.json", forged / "peers" / "shop.json")
    errors = _run_media_with(tmp_path, trust_dir, forged)
    # The genuine shop node names the field and whose root the quote failed to chain to.
    assert "shop.trainer: " in errors and "quote" in errors, errors
    assert "party media's simulated root" in errors, errors


def test_tensor_outside_the_receivers_policy_is_refused(tmp_path: Path, trust_dir: Path) -> None:
    def make() -> Path:
        build = buildkit.vertical_build(tmp_path, rows=200, epochs=1)

        def narrow(policy) -> None:
            # The receiver's policy allows act1 only as float64: the float32 activations the sender's policy
            # allows are not in it.
            for f in policy.flows:
                if f.tensor == "act1":
                    f.spec = buildkit.spec([None, 16], "float64")
                    f.max_bytes *= 2

        buildkit.recompile_policy(build, "shop.trainer", narrow)
        return build

    res = launch(make, tmp_path / "run", trust_dir)
    assert res.exit_code == 3, describe(res)
    errors = _errors(res)
    assert "act1" in errors and "float64" in errors, errors
