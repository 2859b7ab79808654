"""Renderer and validator of the per-node Gramine manifest (compiler/manifest.py, manifest_check.py)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fldsl.compiler.manifest import (
    ManifestError,
    ManifestInputs,
    TrustedFile,
    lint_context_for,
    node_file_uri,
    render_node_manifest,
    trusted_node_files,
)
from fldsl.compiler.manifest_check import LintContext, validate_manifest
from fldsl.measurement import sim_mr_enclave

PLAN_SHA = "a1" * 32
POLICY_SHA = "b2" * 32


def _inputs(**kw: object) -> ManifestInputs:
    base: dict[str, object] = {
        "pipeline": "demo",
        "node_id": "media.trainer",
        "node_files": [
            TrustedFile(uri=node_file_uri("policy.json"), sha256=POLICY_SHA),
            TrustedFile(uri=node_file_uri("plan.json"), sha256=PLAN_SHA),
        ],
    }
    base.update(kw)
    return ManifestInputs(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rendered() -> tuple[ManifestInputs, str, str]:
    inputs = _inputs()
    r = render_node_manifest(inputs)
    return inputs, r.template, r.toml


def _codes(findings: list) -> list[tuple[str, str]]:
    return [(f.code, f.key) for f in findings]


# ---------------------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------------------


def test_rendered_toml_passes_validator_and_production_lint(rendered):
    inputs, _template, toml = rendered
    assert validate_manifest(toml) == []
    assert validate_manifest(toml, lint_context_for(inputs)) == []


def test_rendering_is_byte_identical_and_order_independent(rendered):
    inputs, template, toml = rendered
    again = render_node_manifest(_inputs(node_files=list(reversed(inputs.node_files))))
    assert again.template == template
    assert again.toml == toml
    assert sim_mr_enclave(again.toml.encode()) == sim_mr_enclave(toml.encode())


def test_toml_has_the_fldsl_node_key_set(rendered):
    _, _template, toml = rendered
    doc = tomllib.loads(toml)
    entry = doc["libos"]["entrypoint"]
    # An absolute interpreter (no PATH inside), isolated mode, bytecode from the signed pycache.
    assert doc["loader"]["argv"] == [
        entry, "-I", "-B", "-X", "pycache_prefix=/fldsl/pycache", "-m", "fldsl.runtime.node",
        "--node-dir", "/fldsl/node", "--node", "media.trainer",
        "--addresses", "/fldsl/run/addresses.json", "--run-dir", "/fldsl/run", "--trust-dir", "/fldsl/trust",
        "--manifest", "/fldsl/node/trainer.manifest", "--sigstruct", "/fldsl/node/trainer.sig",
        "--runner", "gramine", "--connect-timeout", "900",
    ]
    assert entry.startswith("/")
    assert "insecure__use_cmdline_argv" not in doc["loader"]
    assert "insecure__use_host_env" not in doc["loader"]
    assert doc["sgx"]["remote_attestation"] == "dcap"
    assert doc["sgx"]["debug"] is False
    assert doc["sgx"]["enclave_size"] == "8G" and doc["sgx"]["max_threads"] == 64
    assert doc["sys"]["stack"]["size"] == "8M"
    assert doc["sys"]["enable_extra_runtime_domain_names_conf"] is True
    env = doc["loader"]["env"]
    for var in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env[var] == "2"  # pools sized by the pipeline, not the host's cores
    mounts = [m["path"] for m in doc["fs"]["mounts"]]
    # /tmp first (a later mount lies over an earlier one: a venv under /tmp stays visible), then Gramine's
    # glibc at /lib before the host's arch folder inside it.
    assert mounts[0] == "/tmp" and doc["fs"]["mounts"][0]["type"] == "tmpfs"
    assert mounts.index("/lib") < mounts.index("/lib/x86_64-linux-gnu")
    by_path = {m["path"]: m for m in doc["fs"]["mounts"]}
    assert by_path["/fldsl/data"]["type"] == "encrypted" and by_path["/fldsl/data"]["key_name"] == "data"
    assert by_path["/fldsl/node"]["uri"] == "file:node"  # relative: the build can move
    trusted = doc["sgx"]["trusted_files"]
    assert {"uri": "file:node/plan.json", "sha256": PLAN_SHA} in trusted
    assert {"uri": "file:node/policy.json", "sha256": POLICY_SHA} in trusted
    assert doc["sgx"]["allowed_files"][:6] == [
        "file:node/pins.json", "file:node/trainer.manifest", "file:node/trainer.sig",
        "file:run/addresses.json", "file:run/checkpoints/media.trainer/", "file:run/models/"]


def test_compile_renders_for_the_reference_machine_so_every_party_gets_the_same_bytes(
        rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two parties compile on their own machines: no host's interpreter, venv or library path may reach the
    unsigned build, or they would never agree on a digest."""
    import sys

    from fldsl.compiler import manifest as M

    inputs, _template, toml = rendered
    assert tomllib.loads(toml)["libos"]["entrypoint"] == "/usr/bin/python3"
    assert sys.prefix not in toml and sys.executable not in toml
    monkeypatch.setattr(sys, "executable", "/opt/elsewhere/bin/python3")
    monkeypatch.setattr(M, "local_arch_libdir", lambda: "/lib/aarch64-linux-gnu")
    assert render_node_manifest(inputs).toml == toml


def test_the_local_rendering_lists_every_file_of_this_interpreter(rendered):
    """What `--sign` renders for an entrypoint: the interpreter and the fldsl code the node imports are
    measured, file by file, each once."""
    import fldsl
    from fldsl.compiler.manifest import render_local

    _, template, _toml = rendered
    doc = tomllib.loads(render_local(template))
    entry = doc["libos"]["entrypoint"]
    trusted = doc["sgx"]["trusted_files"]
    names = [t for t in trusted if isinstance(t, str)]
    assert "file:" + entry in names
    assert "file:" + str(Path(fldsl.__file__).resolve().parent / "artifacts.py") in names
    assert len(names) == len(set(names))
    assert not any(n.endswith((".pyc", ".h")) or "/tests/" in n for n in names)
    assert 1000 < len(names) <= 15000


def test_sim_trust_files_in_the_manifest_are_the_runtimes():
    from fldsl.compiler.manifest import SIM_TRUST_FILES
    from fldsl.runtime.attestation.parties import IDENTITY_FILE
    from fldsl.runtime.attestation.sim import FILES

    assert sorted(SIM_TRUST_FILES) == sorted([*FILES.values(), IDENTITY_FILE])


def test_template_is_machine_independent_with_node_values_baked_in(rendered):
    _, template, _toml = rendered
    for expr in ("gramine.runtimedir()", "entrypoint|toml", "for path in enclave.trusted", "arch_libdir"):
        assert expr in template
    assert '"--node", "media.trainer"' in template
    assert f'sha256 = "{PLAN_SHA}"' in template
    # No fldsl stage-1 delimiters left over, and no machine path of this host.
    assert "<<" not in template and "<%" not in template
    assert "/work/" not in template and f"{Path.home()}/" not in template


def test_inputs_change_the_manifest_and_measurement(rendered):
    _, _template, toml = rendered
    other = render_node_manifest(_inputs(node_files=[
        TrustedFile(uri=node_file_uri("plan.json"), sha256="c3" * 32),
        TrustedFile(uri=node_file_uri("policy.json"), sha256=POLICY_SHA),
    ])).toml
    assert other != toml and sim_mr_enclave(other.encode()) != sim_mr_enclave(toml.encode())
    dbg = tomllib.loads(render_node_manifest(_inputs(debug=True, isv_prod_id=7, isv_svn=3)).toml)
    assert dbg["sgx"]["debug"] is True and dbg["sgx"]["isvprodid"] == 7 and dbg["sgx"]["isvsvn"] == 3


def test_debug_manifest_is_rejected_in_production_unless_allowed():
    inputs = _inputs(debug=True)
    toml = render_node_manifest(inputs).toml
    strict = validate_manifest(toml, LintContext(required_trusted=[node_file_uri("plan.json")]))
    assert ("debug-enclave", "sgx.debug") in _codes(strict)
    assert strict[0].severity == "error"
    allowed = validate_manifest(toml, lint_context_for(inputs))
    assert [(f.code, f.severity) for f in allowed] == [("debug-enclave", "warning")]


def test_outputs_are_sealed_by_the_node_not_an_encrypted_mount():
    # The node seals checkpoints and models itself (AES-256-GCM, fldsl.runtime.sealing); a Gramine
    # encrypted mount keyed by _sgx_mrenclave would not start under gramine-direct. Its output folders are
    # allowed folders, and not reported as broad.
    for encrypted in (True, False):
        inputs = _inputs(outputs_encrypted=encrypted)
        toml = render_node_manifest(inputs).toml
        assert not any(m.get("key_name") == "_sgx_mrenclave" for m in tomllib.loads(toml)["fs"]["mounts"])
        assert validate_manifest(toml, lint_context_for(inputs)) == []
    # ... while a context that wants an encrypted output mount still reports it.
    bad = validate_manifest(toml, LintContext(at_rest_encrypted=True))
    assert "output-not-encrypted" in {f.code for f in bad}


def test_bad_enclave_size_input_is_reported_by_the_validator_not_crashing():
    toml = render_node_manifest(_inputs(enclave_size="12G")).toml
    assert _codes(validate_manifest(toml)) == [("enclave-size", "sgx.enclave_size")]


@pytest.mark.parametrize(
    "field, value",
    [("node_id", 'x"y'), ("node_id", "{{ env.HOME }}"), ("pipeline", "a b"), ("log_level", "{% x %}")],
)
def test_inputs_that_would_break_the_template_are_refused(field, value):
    with pytest.raises(ValidationError):
        _inputs(**{field: value})


def test_trusted_file_uri_and_sha_are_checked():
    with pytest.raises(ValidationError):
        TrustedFile(uri="/fldsl/node/plan.json")
    with pytest.raises(ValidationError):
        TrustedFile(uri=node_file_uri("plan.json"), sha256="ABC")


# ---------------------------------------------------------------------------------------------------------
# trusted_node_files (the runtime's start-up check)
# ---------------------------------------------------------------------------------------------------------


def test_trusted_node_files_reads_back_the_hashes(rendered):
    _, _template, toml = rendered
    assert trusted_node_files(toml) == {"plan.json": PLAN_SHA, "policy.json": POLICY_SHA}


def test_trusted_node_files_rejects_malformed_manifests():
    with pytest.raises(ManifestError, match="not valid TOML"):
        trusted_node_files("sgx.trusted_files = [")
    with pytest.raises(ManifestError, match="no valid sha256"):
        trusted_node_files('sgx.trusted_files = [{ uri = "file:node/plan.json", sha256 = "zz" }]')
    dup = f'{{ uri = "file:node/plan.json", sha256 = "{PLAN_SHA}" }}'
    with pytest.raises(ManifestError, match="listed twice"):
        trusted_node_files(f"sgx.trusted_files = [{dup}, {dup}]")


# ---------------------------------------------------------------------------------------------------------
# Validator: known-bad manifests, each with its specific finding
# ---------------------------------------------------------------------------------------------------------

PLAN_LINE = f'  {{ uri = "file:node/plan.json", sha256 = "{PLAN_SHA}" }},\n'
SEALED_LINE = (
    '  { type = "encrypted", path = "/sealed", uri = "file:/fldsl/sealed", key_name = "_sgx_mrenclave" },\n'
)
MINIMAL = f"""\
libos.entrypoint = "/usr/bin/python3"
loader.log_level = "error"
loader.argv = ["python3", "-m", "fldsl.runtime.node"]
fs.mounts = [
  {{ path = "/usr", uri = "file:/usr" }},
  {{ type = "tmpfs", path = "/tmp" }},
{SEALED_LINE}]
sgx.remote_attestation = "dcap"
sgx.enclave_size = "8G"
sgx.max_threads = 64
sgx.trusted_files = [
  "file:/usr/bin/python3",
{PLAN_LINE}  {{ uri = "file:node/policy.json", sha256 = "{POLICY_SHA}" }},
]
"""

LINT = LintContext(required_trusted=[node_file_uri("plan.json"), node_file_uri("policy.json")])


def _edit(old: str, new: str) -> str:
    assert old in MINIMAL, old
    return MINIMAL.replace(old, new)


def test_minimal_manifest_is_clean():
    assert validate_manifest(MINIMAL, LINT) == []


BAD = [
    # (id, manifest text, expected (code, key), message fragment)
    ("thread_num", _edit("sgx.max_threads = 64", "sgx.thread_num = 64"),
     ("deprecated-key", "sgx.thread_num"), "sgx.max_threads"),
    ("fs.mount table", MINIMAL + 'fs.mount.data.type = "chroot"\nfs.mount.data.path = "/d"\n'
     'fs.mount.data.uri = "file:/d"\n', ("deprecated-key", "fs.mount"), "fs.mounts"),
    ("protected_files", MINIMAL + 'sgx.protected_files = ["file:model.pb"]\n',
     ("deprecated-key", "sgx.protected_files"), "encrypted"),
    ("ra_client_spid", MINIMAL + 'sgx.ra_client_spid = ""\n', ("deprecated-key", "sgx.ra_client_spid"),
     "dcap"),
    ("require_avx", MINIMAL + "sgx.require_avx = true\n", ("deprecated-key", "sgx.require_avx"),
     "sgx.cpu_features.avx"),
    ("preload", MINIMAL + 'loader.preload = "file:libsysdb.so"\n', ("deprecated-key", "loader.preload"),
     "loader.entrypoint"),
    ("entrypoint string", MINIMAL + 'loader.entrypoint = "file:/lib/libsysdb.so"\n',
     ("deprecated-value", "loader.entrypoint"), "loader.entrypoint.uri"),
    ("bool remote_attestation", _edit('sgx.remote_attestation = "dcap"', "sgx.remote_attestation = true"),
     ("deprecated-value", "sgx.remote_attestation"), '"dcap"'),
    ("epid", _edit('sgx.remote_attestation = "dcap"', 'sgx.remote_attestation = "epid"'),
     ("deprecated-value", "sgx.remote_attestation"), "v1.9"),
    ("trusted_files table form",
     _edit("sgx.trusted_files = [", 'sgx.allowed_files.x = "file:/x"\nsgx.trusted_files = ['),
     ("deprecated-key", "sgx.allowed_files"), "array"),
    ("cmdline argv", MINIMAL.replace('loader.argv = ["python3", "-m", "fldsl.runtime.node"]\n', "")
     + "loader.insecure__use_cmdline_argv = true\n",
     ("insecure-key", "loader.insecure__use_cmdline_argv"), "fixed `loader.argv`"),
    ("host env", MINIMAL + "loader.insecure__use_host_env = true\n",
     ("insecure-key", "loader.insecure__use_host_env"), "environment"),
    ("insecure keys", MINIMAL + 'fs.insecure__keys.data = "00112233445566778899aabbccddeeff"\n',
     ("insecure-key", "fs.insecure__keys"), "hard-codes"),
    ("debug in production", MINIMAL + "sgx.debug = true\n", ("debug-enclave", "sgx.debug"),
     "sgx.debug = false"),
    ("non power of two", _edit('"8G"', '"12G"'), ("enclave-size", "sgx.enclave_size"), '"16G"'),
    ("lower-case size", _edit('"8G"', '"8g"'), ("size-format", "sgx.enclave_size"), "upper-case"),
    ("stack size", MINIMAL + 'sys.stack.size = "8 MB"\n', ("size-format", "sys.stack.size"), "upper-case"),
    ("too many threads", _edit("sgx.max_threads = 64", "sgx.max_threads = 5000"),
     ("range", "sgx.max_threads"), "1..4096"),
    ("zero threads", _edit("sgx.max_threads = 64", "sgx.max_threads = 0"), ("range", "sgx.max_threads"),
     "1..4096"),
    ("threads as string", _edit("sgx.max_threads = 64", 'sgx.max_threads = "64"'),
     ("type", "sgx.max_threads"), "integer"),
    ("log level", _edit('loader.log_level = "error"', 'loader.log_level = "verbose"'),
     ("value", "loader.log_level"), '"trace"'),
    ("log level in production", _edit('loader.log_level = "error"', 'loader.log_level = "debug"'),
     ("log-level", "loader.log_level"), '"error"'),
    ("plan not trusted", _edit(PLAN_LINE, ""),
     ("untrusted-node-file", "sgx.trusted_files"), "file:node/plan.json"),
    ("output on plain mount", _edit('{ type = "encrypted", path = "/sealed"', '{ path = "/sealed"'),
     ("output-not-encrypted", "fs.mounts[2].type"), "encrypted"),
    ("output on no mount", _edit(SEALED_LINE, ""), ("output-not-encrypted", "fs.mounts"), "/sealed"),
    ("allowed covers config", MINIMAL + 'sgx.allowed_files = ["file:node/"]\n',
     ("allowed-covers-config", "sgx.allowed_files[0]"), "without measurement"),
    ("allowed covers outputs", MINIMAL + 'sgx.allowed_files = ["file:/fldsl/sealed/model.bin"]\n',
     ("allowed-covers-output", "sgx.allowed_files[0]"), "encrypted output"),
    ("no attestation", _edit('sgx.remote_attestation = "dcap"', 'sgx.remote_attestation = "none"'),
     ("remote-attestation", "sgx.remote_attestation"), '"dcap"'),
    ("unknown key", _edit("sgx.enclave_size", "sgx.enclave_sise"),
     ("unknown-key", "sgx.enclave_sise"), "did you mean `sgx.enclave_size`?"),
    ("key in wrong table", MINIMAL + "loader.max_threads = 4\n",
     ("unknown-key", "loader.max_threads"), "did you mean `sgx.max_threads`?"),
    ("unknown top-level", MINIMAL + "sgxx.debug = false\n", ("unknown-key", "sgxx"), "did you mean `sgx`?"),
    ("relative mount path", _edit('{ path = "/usr"', '{ path = "usr"'), ("mount-path", "fs.mounts[0].path"),
     "absolute"),
    ("bad mount type", _edit('{ type = "tmpfs"', '{ type = "ramfs"'), ("mount-type", "fs.mounts[1].type"),
     '"tmpfs"'),
    ("uri scheme", _edit('uri = "file:/usr"', 'uri = "/usr"'), ("uri-scheme", "fs.mounts[0].uri"), "`file:`"),
    ("chroot without uri", _edit('{ path = "/usr", uri = "file:/usr" }', '{ path = "/usr" }'),
     ("missing-key", "fs.mounts[0].uri"), "required"),
    ("sha256 format", _edit(f'sha256 = "{PLAN_SHA}"', 'sha256 = "XYZ"'),
     ("sha256-format", "sgx.trusted_files[1].sha256"), "hex"),
    ("missing entrypoint", MINIMAL.replace('libos.entrypoint = "/usr/bin/python3"\n', ""),
     ("missing-key", "libos.entrypoint"), "required"),
    ("preheat + edmm", MINIMAL + "sgx.preheat_enclave = true\nsgx.edmm_enable = true\n",
     ("preheat-edmm", "sgx.preheat_enclave"), "cannot be combined"),
    ("stats without debug", MINIMAL + "sgx.enable_stats = true\n", ("needs-debug", "sgx.enable_stats"),
     "debug"),
    ("file check policy", MINIMAL + 'sgx.file_check_policy = "allow_all_but_log"\n',
     ("file-check-policy", "sgx.file_check_policy"), '"strict"'),
    ("env passthrough false", MINIMAL + "loader.env.LD_PRELOAD = { passthrough = false }\n",
     ("env-entry", "loader.env.LD_PRELOAD"), "rejected"),
    ("isvprodid range", MINIMAL + "sgx.isvprodid = 70000\n", ("range", "sgx.isvprodid"), "0..65535"),
    ("seal key mask", MINIMAL + 'sgx.seal_key.flags_mask = "0xff"\n', ("value", "sgx.seal_key.flags_mask"),
     "16 hex"),
    ("overlapping encrypted mounts",
     _edit('  { type = "tmpfs", path = "/tmp" },\n',
           '  { type = "tmpfs", path = "/tmp" },\n'
           '  { type = "encrypted", path = "/out2", uri = "file:/fldsl/sealed/sub", key_name = "k" },\n'),
     ("encrypted-overlap", "fs.mounts[3].uri"), "overlap"),
]


@pytest.mark.parametrize("text, expected, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_known_bad_manifest_gives_its_finding(text, expected, fragment):
    findings = validate_manifest(text, LINT)
    match = [f for f in findings if (f.code, f.key) == expected]
    assert match, f"expected {expected}, got {_codes(findings)}"
    assert fragment in match[0].message
    assert match[0].severity == "error"
    # The message names the key it is about (array entries by their index, or the array itself).
    key = expected[1]
    assert key in match[0].message or key.split("[")[0].rsplit(".", 1)[0] in match[0].message


def test_deprecated_key_is_not_also_reported_as_unknown():
    findings = validate_manifest(_edit("sgx.max_threads = 64", "sgx.thread_num = 64"))
    assert _codes(findings) == [("deprecated-key", "sgx.thread_num")]


def test_schema_only_without_lint_context():
    # Without a lint context only Gramine's own rules apply: debug and missing plan are fine.
    text = _edit(PLAN_LINE, "") + "sgx.debug = true\n"
    assert validate_manifest(text) == []


def test_explicitly_disabled_insecure_option_is_not_flagged():
    assert validate_manifest(MINIMAL + "loader.insecure__disable_aslr = false\n", LINT) == []


def test_toml_syntax_error_has_line_and_column():
    text = MINIMAL.replace('sgx.max_threads = 64', 'sgx.max_threads = = 64')
    (f,) = validate_manifest(text, LINT)
    assert (f.code, f.key, f.severity) == ("toml-syntax", "", "error")
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "= = 64" in s)
    assert (f.line, f.column) == (line, 19)
    assert re.search(rf"line {line}, column 19", f.message)


def test_directory_entry_counts_as_trusting_the_node_files():
    text = _edit(PLAN_LINE, '  "file:node/",\n')
    assert validate_manifest(text, LINT) == []


# ---------------------------------------------------------------------------------------------------------
# Robustness
# ---------------------------------------------------------------------------------------------------------


def test_local_rendering_ignores_this_process_sys_path(rendered, monkeypatch):
    # pytest, IDEs and launchers prepend entries to sys.path; they must not change the measurement.
    import sys

    _, _template, toml = rendered
    monkeypatch.setattr(sys, "path", ["/tmp/some-plugin-dir", *sys.path])
    assert render_node_manifest(_inputs()).toml == toml


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_validator_only_returns_findings_on_mutated_manifests(data):
    text = MINIMAL
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["delete", "insert", "replace-value"]))
        if op == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 20)):]
        elif op == "insert":
            text = text[:pos] + data.draw(st.sampled_from(
                ['"', "[", "]", "{", "}", "=", "\n", ",", "true", "1", "x.y = 2\n", "sgx = 3\n",
                 "fs.mounts = 5\n", 'loader.env.A = { value = "a", passthrough = true }\n'])) + text[pos:]
        else:
            old = data.draw(st.sampled_from(['"8G"', "64", '"dcap"', '"/usr"', "true"]))
            new = data.draw(st.sampled_from(["[]", "{}", "-1", '""', "1.5", "[1, [2]]", "false"]))
            text = text.replace(old, new, 1)
    findings = validate_manifest(text, LINT)
    assert isinstance(findings, list)
    for f in findings:
        assert f.code and f.message and f.severity in ("error", "warning")


def test_runtime_reads_the_same_hashes_as_the_renderer_wrote(rendered):
    from fldsl.runtime import node

    _, _template, toml = rendered
    assert node.listed_hashes(toml, __import__("pathlib").Path("m.toml")) == trusted_node_files(toml)


@pytest.mark.parametrize("toml", [
    'sgx.trusted_files = [{ uri = "file:node/plan.json", sha256 = "ZZ" }]',
    'sgx.trusted_files = [{ uri = "file:node/plan.json", sha256 = 5 }]',
    f'sgx.trusted_files = [{{ uri = "file:node/plan.json", sha256 = "{PLAN_SHA}" }},'
    f' {{ uri = "file:node/plan.json", sha256 = "{POLICY_SHA}" }}]',
    'sgx.trusted_files = "file:node/plan.json"',
])
def test_runtime_refuses_what_the_compiler_rejects(toml):
    """The node's reader was a laxer copy: it skipped a malformed hash and let a second entry win."""
    from fldsl.runtime import node

    with pytest.raises(ManifestError):
        trusted_node_files(toml)
    with pytest.raises(node.NodeError) as e:
        node.listed_hashes(toml, __import__("pathlib").Path("m.toml"))
    assert e.value.code == node.EXIT_TRUST


def test_stage2_supplies_every_template_variable(rendered):
    import jinja2
    from jinja2 import meta

    _, template, _toml = rendered
    env = jinja2.Environment()
    env.filters["toml"] = str
    free = meta.find_undeclared_variables(env.parse(template))
    assert free == {"entrypoint", "arch_libdir", "gramine", "enclave", "qvl_library"}


def test_allowed_directory_is_a_warning_in_production():
    findings = validate_manifest(MINIMAL + 'sgx.allowed_files = ["file:/etc/"]\n', LINT)
    assert [(f.code, f.key, f.severity) for f in findings] == [
        ("broad-allowed-file", "sgx.allowed_files[0]", "warning")]
