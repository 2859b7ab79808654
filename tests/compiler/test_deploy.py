"""`fldsl compile --target kubernetes|compose [--party P]`: one self-contained folder per party.

Every output is validated: Kubernetes objects with kubernetes-validate (--strict, the newest Kubernetes
version it knows), compose files with `docker compose config -q` where the docker CLI has its compose
plugin, else against the Compose Specification's JSON schema (vendored: tests/compiler/compose-spec.json,
its source and licence in its "$comment"). Each is skipped, with the reason, where its validator is
missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fldsl.api import check, compile_pipeline
from fldsl.cli import main
from fldsl.compiler import lower
from fldsl.compiler.deploy import (
    BOOTSTRAP_PORT,
    MEASURED_PEAK_KIB,
    PORT,
    UID,
    memory_mib,
    service_name,
)
from fldsl.diagnostics import FldslError

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines"
VERTICAL, HORIZONTAL = PIPELINES / "vertical_wide_deep.flp", PIPELINES / "horizontal_dlrm.flp"
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """compile(pipeline, target, **options) -> CompileResult, each distinct compile done once per module."""
    done: dict[tuple[Any, ...], Any] = {}
    root = tmp_path_factory.mktemp("deploy")

    def compile_(pipeline: Path, target: str, **options: Any) -> Any:
        key = (pipeline, target, *sorted(options.items()))
        if key not in done:
            out = root / f"b{len(done)}"
            done[key] = compile_pipeline(pipeline, out, target=target, **options)
        return done[key]

    yield compile_


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[test]')")


def load_yaml(text: str) -> Any:
    yaml = _yaml()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _docs(path: Path) -> list[dict[str, Any]]:
    yaml = _yaml()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d is not None]


def k8s_objects(folder: Path) -> list[dict[str, Any]]:
    return [d for f in sorted(folder.glob("*.yaml")) for d in _docs(f)]


def party_dirs(result: Any, target: str) -> dict[str, Path]:
    base = result.build_dir / "deploy" / target
    return {p.name: p for p in sorted(base.iterdir())}


def parties(pipeline: Path) -> list[str]:
    return [p.name for p in check(pipeline).parties]


def peers(pipeline: Path) -> dict[str, set[str]]:
    program = check(pipeline)
    return {n.id: {p.id for p in lower.peers_of(program, n)} for n in program.nodes}


def _dcap(tmp_path: Path, pipeline: Path) -> Path:
    f = tmp_path / pipeline.name
    f.write_text(pipeline.read_text().replace("attestation sim", "attestation dcap"))
    return f


def _kv() -> Any:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed "
                             "(pip install -e '.[test]')")
    return kv


def validate_kubernetes(objects: list[dict[str, Any]]) -> str:
    """Strict validation of every object against the newest Kubernetes version the validator knows."""
    kv = _kv()
    version = kv.latest_version()
    for obj in objects:
        kv.validate(obj, version, strict=True)
    return version


@cache
def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0


def validate_compose(path: Path) -> str:
    """`docker compose config -q` (no daemon needed) where the plugin exists, else the JSON schema."""
    if _docker_compose_works():
        env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "FLDSL_UID": "1000"}
        r = subprocess.run(["docker", "compose", "-f", str(path), "config", "-q"], capture_output=True,
                           text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        return "docker compose config"
    jsonschema = pytest.importorskip("jsonschema",
                                     reason="neither `docker compose` nor jsonschema is available")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    doc = load_yaml(path.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    return "compose-spec schema"


# ---------------------------------------------------------------------------------------------------------
# validity: every output of both targets, for a vertical and a horizontal pipeline
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [VERTICAL, HORIZONTAL], ids=["vertical", "horizontal"])
def test_kubernetes_folders_validate(built: Any, pipeline: Path) -> None:
    r = built(pipeline, "kubernetes")
    dirs = party_dirs(r, "kubernetes")
    assert sorted(dirs) == sorted(parties(pipeline))  # one folder per party, each with its own objects
    for party, folder in dirs.items():
        nodes = [n for n in check(pipeline).nodes if n.party == party]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["00-namespace.yaml", "10-addresses.yaml", *(f"20-{service_name(n.id)}.yaml" for n in nodes)])
        objects = k8s_objects(folder)
        validate_kubernetes(objects)
        kinds = sorted(o["kind"] for o in objects)
        n = len(nodes)
        assert kinds == sorted(["Namespace", "ConfigMap", *["ConfigMap", "PersistentVolumeClaim", "Service",
                                                            "NetworkPolicy", "Job"] * n])
        assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
            f"{service_name(check(pipeline).pipeline)}-{party}"}


@pytest.mark.parametrize("pipeline", [VERTICAL, HORIZONTAL], ids=["vertical", "horizontal"])
def test_compose_projects_validate(built: Any, pipeline: Path) -> None:
    r = built(pipeline, "compose")
    dirs = party_dirs(r, "compose")
    assert sorted(dirs) == sorted(parties(pipeline))
    for party, folder in dirs.items():
        assert sorted(p.name for p in folder.iterdir()) == ["addresses.json", "compose.yaml"]
        validate_compose(folder / "compose.yaml")
        doc = load_yaml((folder / "compose.yaml").read_text())
        assert sorted(doc["services"]) == sorted(
            service_name(n.id) for n in check(pipeline).nodes if n.party == party)


def test_the_validators_can_fail(built: Any, tmp_path: Path) -> None:
    """The checks above would see a wrong field, type or kind."""
    kv = _kv()
    objects = k8s_objects(party_dirs(built(VERTICAL, "kubernetes"), "kubernetes")["media"])
    job = next(o for o in objects if o["kind"] == "Job")
    job["spec"]["template"]["spec"]["restartPolicy"] = 1
    with pytest.raises(kv.ValidationError):
        validate_kubernetes([job])
    job["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    job["spec"]["template"]["spec"]["containers"][0]["runAsRoot"] = False  # not a field: strict refuses it
    with pytest.raises(kv.ValidationError):
        validate_kubernetes([job])
    compose = party_dirs(built(VERTICAL, "compose"), "compose")["media"] / "compose.yaml"
    doc = load_yaml(compose.read_text())
    doc["services"]["media-trainer"]["restart_policy"] = "always"
    bad = tmp_path / "compose.yaml"
    bad.write_text(json.dumps(doc))
    with pytest.raises(AssertionError):
        validate_compose(bad)


# ---------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["kubernetes", "compose"])
@pytest.mark.parametrize("pipeline", [VERTICAL, HORIZONTAL], ids=["vertical", "horizontal"])
def test_a_party_folder_holds_its_own_trust_material_only(built: Any, pipeline: Path, target: str) -> None:
    r = built(pipeline, target)
    program = check(pipeline)
    pipe = service_name(program.pipeline)
    for party, folder in party_dirs(r, target).items():
        others = [p for p in parties(pipeline) if p != party]
        text = "".join(f.read_text() for f in sorted(folder.iterdir()))
        for other in others:  # no other party's Secret, folder or key, anywhere
            assert f"trust-{other}" not in text and f"trust/{other}" not in text, (party, other)
        talks_to = sorted({p.split(".")[0] for n in program.nodes if n.party == party
                           for p in peers(pipeline)[n.id]} - {party})
        if target == "kubernetes":
            secrets = set()
            for o in k8s_objects(folder):
                for v in o.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
                    if "secret" in v:
                        secrets.add(v["secret"]["secretName"])
                        # the party's own files, its peers' public identities at peers/<party>.json
                        assert [i["path"] for i in v["secret"]["items"] if "/" in i["path"]] == [
                            f"peers/{p}.json" for p in talks_to]
                        assert all("/" not in i["key"] for i in v["secret"]["items"])
                        mount = next(m for m in o["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                                     if m["name"] == v["name"])
                        assert mount == {"name": "trust", "mountPath": "/fldsl/trust", "readOnly": True}
            assert secrets == {f"{pipe}-trust-{party}"}
            # The Secret is made from the party's own folder only (the header's command)
            command = re.findall(r"kubectl create secret generic .*?(?=\n#\s+\()", text, re.S)
            assert len(command) == 1 and f"--from-file=.fldsl/trust/{party}/" in command[0]
            pinned = r"--from-file=peers\.(\w+)\.json=\.fldsl/trust/" + party + r"/peers/\1\.json"
            assert sorted(re.findall(pinned, command[0])) == talks_to
        else:
            doc = load_yaml((folder / "compose.yaml").read_text())
            for svc in doc["services"].values():
                trust = [v for v in svc["volumes"] if v.endswith(":/fldsl/trust:ro")]
                assert len(trust) == 1 and trust[0].endswith(f"/{party}:/fldsl/trust:ro"), trust


@pytest.mark.parametrize("pipeline", [VERTICAL, HORIZONTAL], ids=["vertical", "horizontal"])
def test_names_carry_the_digest_and_a_new_digest_never_mounts_the_old_volumes(
        built: Any, pipeline: Path, tmp_path: Path) -> None:
    r = built(pipeline, "kubernetes")
    d12 = r.digest[:12]
    claims: set[str] = set()
    for folder in party_dirs(r, "kubernetes").values():
        for o in k8s_objects(folder):
            if o["kind"] != "Namespace":  # (one namespace per pipeline and party, across recompiles)
                assert d12 in o["metadata"]["name"], o["metadata"]["name"]
                assert o["metadata"]["labels"]["fldsl/digest"] == d12
            if o["kind"] == "Job":
                pod = o["spec"]["template"]["spec"]
                for v in pod["volumes"]:
                    if "persistentVolumeClaim" in v:
                        assert d12 in v["persistentVolumeClaim"]["claimName"]
                        claims.add(v["persistentVolumeClaim"]["claimName"])
                    if "configMap" in v:
                        assert d12 in v["configMap"]["name"]
            if o["kind"] in ("Service", "NetworkPolicy"):
                spec = o["spec"]
                sel = spec["selector"] if o["kind"] == "Service" else spec["podSelector"]["matchLabels"]
                assert sel["fldsl/digest"] == d12
    c = built(pipeline, "compose")
    for folder in party_dirs(c, "compose").values():
        doc = load_yaml((folder / "compose.yaml").read_text())
        assert c.digest[:12] in doc["name"]
        assert all(c.digest[:12] in v["name"] for v in doc["volumes"].values())
    # Other parameters: another digest, and none of the old volumes
    other = compile_pipeline(pipeline, tmp_path / "o", {"rows": "1200"}, target="kubernetes")
    assert other.digest != r.digest
    new_claims = {v["persistentVolumeClaim"]["claimName"]
                  for folder in party_dirs(other, "kubernetes").values() for o in k8s_objects(folder)
                  if o["kind"] == "Job" for v in o["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
    assert new_claims and not new_claims & claims


@pytest.mark.parametrize("pipeline", [VERTICAL, HORIZONTAL], ids=["vertical", "horizontal"])
def test_every_node_is_a_job_that_restarts_on_failure_and_stays_finished(built: Any, pipeline: Path) -> None:
    r = built(pipeline, "kubernetes")
    jobs = []
    for folder in party_dirs(r, "kubernetes").values():
        objects = k8s_objects(folder)
        assert not [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet", "Pod")]
        jobs += [o for o in objects if o["kind"] == "Job"]
    assert len(jobs) == len(check(pipeline).nodes)
    for job in jobs:
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "OnFailure" and 0 < spec["backoffLimit"] <= 10
        assert "ttlSecondsAfterFinished" not in spec  # a deleted Job would run again at the next apply
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == UID
        assert pod["automountServiceAccountToken"] is False
        (c,) = pod["containers"]
        assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
        assert c["command"][:4] == ["python3", "-I", "-m", "fldsl.runtime.node"]
        # Probes on the bootstrap port (open once attested, and while waiting for peers); liveness is slow
        # and only counts after startup.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["tcpSocket"] == {"port": "bootstrap"}
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
        req, lim = (c["resources"][k]["memory"] for k in ("requests", "limits"))
        assert int(req.removesuffix("Mi")) * 1024 >= MEASURED_PEAK_KIB and int(lim.removesuffix("Mi")) > int(
            req.removesuffix("Mi"))
    # compose: the same restart semantics
    for folder in party_dirs(built(pipeline, "compose"), "compose").values():
        for svc in load_yaml((folder / "compose.yaml").read_text())["services"].values():
            assert svc["restart"].startswith("on-failure")
            assert svc["user"].endswith(f":{UID}") and not svc["user"].startswith("0")
            assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
            assert svc["security_opt"] == ["no-new-privileges:true"]


def test_memory_follows_the_links_a_node_buffers_for() -> None:
    program = check(HORIZONTAL)
    hub = memory_mib(program, program.node("hub.ps"))
    bank = memory_mib(program, program.node("bank1.worker"))
    assert hub[0] > bank[0] >= MEASURED_PEAK_KIB / 1024  # the aggregator buffers for four banks
    assert hub[1] - hub[0] == bank[1] - bank[0] == 512


@pytest.mark.parametrize("pipeline", [VERTICAL, HORIZONTAL], ids=["vertical", "horizontal"])
def test_network_policy_admits_exactly_the_pipelines_peers(built: Any, pipeline: Path) -> None:
    r = built(pipeline, "kubernetes")
    pipe = service_name(check(pipeline).pipeline)
    expected = peers(pipeline)
    seen = {}
    for party, folder in party_dirs(r, "kubernetes").items():
        for o in k8s_objects(folder):
            if o["kind"] != "NetworkPolicy":
                continue
            node = o["spec"]["podSelector"]["matchLabels"]["fldsl/node"]
            assert o["spec"]["policyTypes"] == ["Ingress"]
            (rule,) = o["spec"]["ingress"]
            assert sorted(p["port"] for p in rule["ports"]) == [PORT, BOOTSTRAP_PORT]
            admitted = set()
            for peer in rule["from"]:
                assert "podSelector" in peer and "ipBlock" not in peer
                label = peer["podSelector"]["matchLabels"]
                assert label["fldsl/digest"] == r.digest[:12]
                ns = peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
                    "kubernetes.io/metadata.name", f"{pipe}-{party}")
                admitted.add((ns, label["fldsl/node"]))
            seen[node] = admitted
    program = check(pipeline)
    assert seen == {service_name(n.id): {(f"{pipe}-{p.split('.')[0]}", service_name(p))
                                         for p in expected[n.id]} for n in program.nodes}


@pytest.mark.parametrize("target", ["kubernetes", "compose"])
@pytest.mark.parametrize("pipeline", [VERTICAL, HORIZONTAL], ids=["vertical", "horizontal"])
def test_nodes_listen_on_all_interfaces_in_their_containers(built: Any, pipeline: Path, target: str) -> None:
    r = built(pipeline, target)
    for party, folder in party_dirs(r, target).items():
        if target == "kubernetes":
            (cm,) = [o for o in _docs(folder / "10-addresses.yaml")]
            addresses = json.loads(cm["data"]["addresses.json"])
        else:
            addresses = json.loads((folder / "addresses.json").read_text())
        own = {n.id for n in check(pipeline).nodes if n.party == party}
        needed = own | {p for n in own for p in peers(pipeline)[n]}
        assert set(addresses) == needed  # its nodes and their peers, nobody else
        for nid, entry in addresses.items():
            if nid in own:
                assert entry["listen"] == "0.0.0.0" and (entry["port"], entry["bootstrap_port"]) == (
                    PORT, BOOTSTRAP_PORT)
            else:
                assert "listen" not in entry  # where another party's node binds is its business
        if target == "compose":  # published for the other parties' nodes, at the ports they were given
            doc = load_yaml((folder / "compose.yaml").read_text())
            for nid in own:
                svc = doc["services"][service_name(nid)]
                cross = any(p.split(".")[0] != party for p in peers(pipeline)[nid])
                assert bool(svc.get("ports")) == cross


@pytest.mark.parametrize("target", ["kubernetes", "compose"])
def test_output_is_deterministic(tmp_path: Path, target: str) -> None:
    def snapshot() -> dict[str, bytes]:
        r = compile_pipeline(HORIZONTAL, tmp_path / "b", target=target)
        base = r.build_dir / "deploy"
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    first = snapshot()
    assert first and snapshot() == first


# ---------------------------------------------------------------------------------------------------------
# --party, --addresses, --expose, --image
# ---------------------------------------------------------------------------------------------------------


def test_party_writes_that_partys_folder_only(built: Any) -> None:
    r = built(VERTICAL, "kubernetes", party="shop")
    assert sorted(party_dirs(r, "kubernetes")) == ["shop"]
    assert all(f.startswith("deploy/kubernetes/shop/") for f in r.files if f.startswith("deploy/"))
    # Byte-identical to the shop folder of a compile of every party: a party's folder does not depend on
    # whether the others were written.
    every = built(VERTICAL, "kubernetes")
    for f in sorted(party_dirs(r, "kubernetes")["shop"].iterdir()):
        assert f.read_bytes() == (party_dirs(every, "kubernetes")["shop"] / f.name).read_bytes()


def test_an_unknown_party_is_named_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(FldslError) as e:
        compile_pipeline(VERTICAL, tmp_path / "b", target="compose", party="shpo")
    (d,) = e.value.diagnostics
    assert "--party shpo: no such party in pipeline vertical_wide_deep" in d.message
    assert d.hint == "did you mean `shop`?"
    assert not (tmp_path / "b").exists()  # options are checked before the build is written
    r = CliRunner().invoke(main, ["compile", str(VERTICAL), "-o", str(tmp_path / "c"), "--target",
                                  "kubernetes", "--party", "Media"])
    assert r.exit_code == 2 and "did you mean `media`?" in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (["--party", "media"], "--party only with --target kubernetes|compose"),
    (["--target", "compose", "--expose", "nodeport"], "--expose only with --target kubernetes"),
    (["--target", "kubernetes", "--expose", "ingress"], "Invalid value for '--expose'"),
])
def test_flags_that_need_another_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["compile", str(VERTICAL), "-o", str(tmp_path / "b"), *args])
    assert r.exit_code == 2 and message in r.output, r.output


def _agreed(tmp_path: Path, entries: dict[str, Any]) -> Path:
    f = tmp_path / "addresses.json"
    f.write_text(json.dumps(entries))
    return f


def test_cross_cluster_addresses_give_ports_and_ip_blocks(tmp_path: Path) -> None:
    agreed = _agreed(tmp_path, {
        "media.trainer": {"host": "198.51.100.7", "port": 31443, "bootstrap_port": 31444},
        "shop.trainer": {"host": "203.0.113.9", "port": 30443, "bootstrap_port": 30444},
    })
    r = compile_pipeline(VERTICAL, tmp_path / "b", target="kubernetes", party="media", expose="nodeport",
                         addresses=agreed)
    objects = k8s_objects(r.build_dir / "deploy/kubernetes/media")
    validate_kubernetes(objects)
    svc = next(o for o in objects if o["kind"] == "Service")
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["externalTrafficPolicy"] == "Local"
    assert [(p["port"], p.get("nodePort")) for p in svc["spec"]["ports"]] == [(PORT, 31443),
                                                                             (BOOTSTRAP_PORT, 31444)]
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "203.0.113.9/32"}}]
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and "addresses.json" in o["data"])
    assert json.loads(cm["data"]["addresses.json"])["shop.trainer"] == {
        "host": "203.0.113.9", "port": 30443, "bootstrap_port": 30444}
    # A load balancer listens on the agreed ports; egress_cidrs say where a peer's connections come from.
    agreed = _agreed(tmp_path, {
        "media.trainer": {"host": "lb.media.example", "port": 443, "bootstrap_port": 444},
        "shop.trainer": {"host": "lb.shop.example", "port": 7443, "bootstrap_port": 7444,
                         "egress_cidrs": ["192.0.2.0/28", "192.0.2.100"]},
    })
    r = compile_pipeline(VERTICAL, tmp_path / "c", target="kubernetes", party="media", expose="loadbalancer",
                         addresses=agreed)
    objects = k8s_objects(r.build_dir / "deploy/kubernetes/media")
    validate_kubernetes(objects)
    svc = next(o for o in objects if o["kind"] == "Service")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(443, "secure"),
                                                                           (444, "bootstrap")]
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "192.0.2.0/28"}},
                                                    {"ipBlock": {"cidr": "192.0.2.100/32"}}]
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and "addresses.json" in o["data"])
    assert "egress_cidrs" not in cm["data"]["addresses.json"]  # (not a runtime field)


def test_a_peer_known_by_name_only_is_not_admitted_and_the_compile_says_so(tmp_path: Path) -> None:
    agreed = _agreed(tmp_path, {"shop.trainer": {"host": "ml.shop.example", "port": 7443,
                                                 "bootstrap_port": 7444}})
    r = compile_pipeline(VERTICAL, tmp_path / "b", target="kubernetes", party="media", addresses=agreed)
    text = (r.build_dir / "deploy/kubernetes/media/20-media-trainer.yaml").read_text()
    objects = k8s_objects(r.build_dir / "deploy/kubernetes/media")
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"] == []  # nobody: a rule without `from` would admit everyone
    assert "shop.trainer: NOT ADMITTED: it is reached at the host name ml.shop.example" in text
    assert [w.message for w in r.warnings if "egress_cidrs" in w.message] == [
        "media.trainer's NetworkPolicy cannot admit shop.trainer (host name ml.shop.example); give "
        "`egress_cidrs` for it in --addresses"]


@pytest.mark.parametrize("entries, message, hint", [
    ({"media.trainer": {"host": "a", "port": 1, "bootstrap_port": 2}},
     "no entry for shop.trainer, which party media's nodes talk to", None),
    ({"shop.trainr": {"host": "a", "port": 1, "bootstrap_port": 2}},
     "no node `shop.trainr` in pipeline vertical_wide_deep", "did you mean `shop.trainer`?"),
    ({"shop.trainer": {"host": "a", "port": 1, "bootstrap_port": 1}}, "port and bootstrap_port must differ",
     None),
    ({"shop.trainer": {"host": "a", "port": 1, "bootstrap_port": 2, "egress_cidrs": ["10.0.0.300/8"]}},
     "shop.trainer: egress_cidrs", None),
    ({"shop.trainer": {"host": "a", "port": 1, "bootstrap_port": 2},
      "media.trainer": {"host": "b", "port": 7443, "bootstrap_port": 7444}},
     "--expose nodeport: media.trainer's secure port 7443 in --addresses is outside the NodePort range",
     None),
])
def test_a_wrong_addresses_file_is_refused_naming_the_entry(tmp_path: Path, entries: dict[str, Any],
                                                            message: str, hint: str | None) -> None:
    with pytest.raises(FldslError) as e:
        compile_pipeline(VERTICAL, tmp_path / "b", target="kubernetes", party="media", expose="nodeport",
                         addresses=_agreed(tmp_path, entries))
    (d,) = e.value.diagnostics
    assert message in d.message, d.message
    if hint:
        assert d.hint == hint


def test_image_flag_names_what_the_nodes_run(built: Any) -> None:
    r = built(VERTICAL, "compose", image="registry.bank-a.example/fldsl:0.1.0", party="media")
    doc = load_yaml((r.build_dir / "deploy/compose/media/compose.yaml").read_text())
    assert doc["services"]["media-trainer"]["image"] == "registry.bank-a.example/fldsl:0.1.0"
    r = built(VERTICAL, "kubernetes")
    for folder in party_dirs(r, "kubernetes").values():
        for o in k8s_objects(folder):
            if o["kind"] == "Job":
                assert o["spec"]["template"]["spec"]["containers"][0]["image"] == "fldsl:0.1.0"
        assert "docker build -t fldsl:0.1.0 ." in (folder / "00-namespace.yaml").read_text()


# ---------------------------------------------------------------------------------------------------------
# attestation dcap, data
# ---------------------------------------------------------------------------------------------------------


def test_kubernetes_dcap(tmp_path: Path) -> None:
    r = compile_pipeline(_dcap(tmp_path, HORIZONTAL), tmp_path / "b", target="kubernetes", party="hub")
    folder = r.build_dir / "deploy/kubernetes/hub"
    assert sorted(p.name for p in folder.iterdir()) == [
        "00-namespace.yaml", "10-addresses.yaml", "20-hub-ps.yaml", "node-image.Dockerfile"]
    objects = k8s_objects(folder)
    validate_kubernetes(objects)
    job = next(o for o in objects if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["gramine-sgx", "node/ps"] and c["workingDir"] == "/fldsl/nodes/hub.ps"
    assert c["image"] == f"fldsl-horizontal-dlrm-hub:{r.digest[:12]}"
    limits = c["resources"]["limits"]
    assert limits["sgx.intel.com/epc"] == "8Gi"  # Gramine's "8G" is 8 GiB
    assert limits["sgx.intel.com/enclave"] == limits["sgx.intel.com/provision"] == 1
    assert {"name": "aesmd", "mountPath": "/var/run/aesmd"} in c["volumeMounts"]
    assert {"name": "aesmd", "hostPath": {"path": "/var/run/aesmd", "type": "Directory"}} in pod["volumes"]
    assert not [v for v in pod["volumes"] if "secret" in v]  # real quotes: no simulated trust material
    assert c["securityContext"]["runAsNonRoot"] is True
    dockerfile = (folder / "node-image.Dockerfile").read_text()
    assert "FROM ${BASE}" in dockerfile and "COPY nodes/hub.ps/ /fldsl/nodes/hub.ps/node/" in dockerfile
    assert dockerfile.rstrip().endswith(f"USER {UID}:{UID}")
    assert "bank1" not in dockerfile


def test_compose_dcap_mounts_the_aesm_socket_and_the_working_folder(tmp_path: Path) -> None:
    r = compile_pipeline(_dcap(tmp_path, VERTICAL), tmp_path / "b", target="compose", party="media")
    path = r.build_dir / "deploy/compose/media/compose.yaml"
    validate_compose(path)
    svc = load_yaml(path.read_text())["services"]["media-trainer"]
    assert svc["working_dir"] == "/fldsl/work" and svc["command"] == ["gramine-sgx", "node/trainer"]
    assert svc["image"] == "fldsl:0.1.0-sgx" and svc["devices"] == ["/dev/sgx_enclave", "/dev/sgx_provision"]
    assert "/var/run/aesmd:/var/run/aesmd" in svc["volumes"]
    assert "../../../nodes/media.trainer:/fldsl/work/node:ro" in svc["volumes"]
    assert "./addresses.json:/fldsl/work/run/addresses.json:ro" in svc["volumes"]
    assert not [v for v in svc["volumes"] if "/fldsl/trust" in v]


def test_declared_relative_data_is_mounted_where_the_node_looks(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema block keeps the path as declared; a relative one is opened from the node's working folder,
    so the compose container gets the folder there (from the folder it names where compile ran). On
    Kubernetes the party's data volume holds the files by name and the node is told where (--data)."""
    monkeypatch.chdir(tmp_path)
    flp = PIPELINES / "fate_breast_vertical.flp"
    r = compile_pipeline(flp, tmp_path / "b", {"data_dir": "data/fate"}, target="compose", party="guest")
    text = (r.build_dir / "deploy/compose/guest/compose.yaml").read_text()
    assert f'"{Path.cwd()}/data/fate:/fldsl/node/data/fate:ro"' in text
    r = compile_pipeline(flp, tmp_path / "k", {"data_dir": "/srv/fate"}, target="kubernetes", party="guest")
    objects = k8s_objects(r.build_dir / "deploy/kubernetes/guest")
    validate_kubernetes(objects)
    pod = next(o for o in objects if o["kind"] == "Job")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--data=patients=/fldsl/data/breast_hetero_guest.csv" in c["command"]
    assert {"name": "data", "mountPath": "/fldsl/data", "readOnly": True} in c["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "fate-breast-vertical-guest-data",
                                                      "readOnly": True}} in pod["volumes"]
    assert not [v for v in pod["volumes"] if "hostPath" in v]  # the "restricted" Pod Security Standard


# ---------------------------------------------------------------------------------------------------------
# the image
# ---------------------------------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_regular_install_with_fldsl_as_entrypoint() -> None:
    """Structure only: no image is built here (no docker daemon, no network for apt and pip)."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages = [ln.split()[-1] for ln in lines if ln.upper().startswith("FROM ") and " AS " in ln.upper()]
    assert stages[-1] == "fldsl" and "sgx" in stages  # the default build is the plain image
    assert not re.search(r"pip[^\n]*install[^\n]*(-e\b|--editable)", text)  # a regular install, not editable
    assert re.search(r"pip[^\n]*install[^\n]*/src", text)
    for stage in ("fldsl", "sgx"):  # each image ends as the numeric non-root user (runAsNonRoot can check)
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        users = re.findall(r"^USER\s+(\S+)", body, re.M)
        assert users and users[-1] == f"{UID}:{UID}", (stage, users)
    assert 'ENTRYPOINT ["fldsl"]' in text
    assert "https://packages.gramineproject.io/" in text and "ARG GRAMINE=gramine\n" in text
    assert re.search(r"apt-get install[^\n]*\$\{GRAMINE\}", text.split(" AS sgx\n", 1)[1])
    assert "/opt/fldsl/venv/bin" in text  # python3 on PATH is the venv's, as `python3 -I -m ...` expects
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".fldsl", ".venv", "build", "runs", ".git"} <= set(ignored)  # no trust material in any image


# ---------------------------------------------------------------------------------------------------------
# the generated Jobs run: each party's node as the kubelet would start it, on this machine
# ---------------------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _project(objects: list[dict[str, Any]], pod: dict[str, Any], trust: Path, root: Path,
             ports: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """The pod's volumes laid out as the kubelet projects them (ConfigMap keys as files; the Secret that
    `kubectl create secret generic --from-file=DIR/ --from-file=peers.X.json=...` makes, through `items`,
    mode defaultMode), under ``root``; addresses on loopback at ``ports``. Returns {mountPath: folder}."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = {p.name: p.read_bytes() for p in trust.iterdir() if p.is_file()}
    secret |= {f"peers.{p.stem}.json": p.read_bytes() for p in (trust / "peers").iterdir()}
    out = {}
    for m in pod["containers"][0]["volumeMounts"]:
        v, folder = volumes[m["name"]], root / m["mountPath"].lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        out[m["mountPath"]] = folder
        if "configMap" in v:
            name = v["configMap"]["name"]
            (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
            for key, text in cm["data"].items():
                if key == "addresses.json":  # one machine: loopback, a port pair per node
                    entries = json.loads(text)
                    for nid, e in entries.items():
                        e["host"], (e["port"], e["bootstrap_port"]) = "127.0.0.1", ports[nid]
                    text = json.dumps(entries)
                (folder / key).write_text(text)
        elif "secret" in v:
            for item in v["secret"]["items"]:  # a KeyError here: an item the documented command never makes
                (folder / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (folder / item["path"]).write_bytes(secret[item["key"]])
                (folder / item["path"]).chmod(v["secret"]["defaultMode"])
    return out


@pytest.mark.e2e
@pytest.mark.slow
def test_each_partys_job_attests_and_trains(tmp_path: Path) -> None:
    """media's and shop's Jobs, their ConfigMaps and trust Secrets projected as the kubelet does, started with
    the Job's own command line (python3 -I, --node-dir, its own party's trust folder only, listening on
    0.0.0.0): they attest each other, train and export. Only the addresses are rewritten to loopback."""
    import os
    import sys

    from fldsl.measurement import code_digest
    from fldsl.runtime.attestation.parties import local_deployment

    code_digest.cache_clear()  # the pins must cover the code the nodes start with, not an earlier test's
    r = compile_pipeline(VERTICAL, tmp_path / "build", {"rows": "400"}, target="kubernetes")
    local_deployment(tmp_path / "trust", ["media", "shop"])
    free = _free_ports(4)
    ports = {"media.trainer": (free[0], free[1]), "shop.trainer": (free[2], free[3])}
    procs = {}
    for party in ("media", "shop"):
        objects = k8s_objects(r.build_dir / "deploy/kubernetes" / party)
        pod = next(o for o in objects if o["kind"] == "Job")["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        mounts = _project(objects, pod, tmp_path / "trust" / party, tmp_path / "pods" / party, ports)

        def local(arg: str, mounts: dict[str, Path] = mounts) -> str:
            for inside, folder in mounts.items():
                if arg == inside or arg.startswith(inside + "/"):
                    return str(folder) + arg[len(inside):]
            return arg

        assert c["command"][0] == "python3"
        cmd = [sys.executable, *(local(a) for a in c["command"][1:])]
        env = {**{e["name"]: e["value"] for e in c["env"]}, "PATH": os.environ.get("PATH", ""),
               "HOME": str(mounts["/tmp"])}
        out, log = tmp_path / f"{party}.out", tmp_path / f"{party}.log"
        with out.open("w") as o, log.open("w") as e:
            procs[party] = (subprocess.Popen(cmd, cwd=local(c["workingDir"]), env=env, stdout=o, stderr=e),
                            out, log)
    for party, (p, out, log) in procs.items():
        try:
            p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for q, _, _ in procs.values():
                q.kill()
            raise
        assert p.returncode == 0, log.read_text()[-3000:]
        events = [json.loads(line.removeprefix("@fldsl ")) for line in out.read_text().splitlines()
                  if line.startswith("@fldsl")]
        done = next(e for e in events if e["event"] == "done")
        assert f"{party}.trainer/model" in done["exports"]
        assert (tmp_path / "pods" / party / "fldsl/sealed/models" / f"{party}.trainer_model.sealed").is_file()
