"""Emit a build directory (layout in ``fldsl.artifacts``) from a checked program.

Order per node: plan.json + policy.json -> their sha256 -> the node's Gramine manifest (template + the same
rendered locally, listing plan/policy as trusted files with those hashes) -> simulated MRENCLAVE over the
rendered TOML -> one pin table for the whole deployment, written to every node -> manifest lint (an error
fails the compile) -> pipeline.json with the pipeline digest over the source, the stdlib modules used and
every rendered artifact. Output is byte-identical for the same input.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fldsl.artifacts import (
    Identity,
    NodeSummary,
    Pins,
    PipelineFile,
    Plan,
    dump_json,
    node_dir,
    sha256_hex,
)
from fldsl.compiler import lower
from fldsl.compiler.ir import IRNode, Program
from fldsl.diagnostics import Diagnostic, FldslError
from fldsl.measurement import sim_mr_enclave

if TYPE_CHECKING:  # a type only: the manifest modules are imported inside the functions, as before
    from fldsl.compiler.manifest import ManifestInputs

# Source of each stdlib module a pipeline can `use` (its text is part of the pipeline digest).
STDLIB_MODULE_FILES = {"std.models": "signatures.py"}


class EmitError(Exception):
    """The build directory cannot be written (the message names the path)."""


@dataclass
class CompileResult:
    build_dir: Path
    digest: str
    files: list[str] = field(default_factory=list)  # relative paths written, sorted
    warnings: list[Diagnostic] = field(default_factory=list)


def _manifest_names(node_id: str) -> tuple[str, str]:
    node = node_id.split(".", 1)[1]
    return f"{node}.manifest.template", f"{node}.manifest.toml"


def _check_target(out: Path) -> None:
    """Only an empty directory or a previous build (it has pipeline.json) is ever replaced."""
    if out.exists():
        if not out.is_dir():
            raise EmitError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not (out / "pipeline.json").is_file():
            raise EmitError(f"{out}: not empty and not a previous fldsl build; refusing to overwrite it")


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _stdlib_digest(module: str) -> str:
    from fldsl import stdlib

    f = Path(stdlib.__file__).resolve().parent / STDLIB_MODULE_FILES[module]
    return hashlib.sha256(f.read_bytes()).hexdigest()


def emit(program: Program, source: str, out: Path, file: str = "<input>") -> CompileResult:
    """Write the build into a temporary sibling folder and move it into place only when complete, so a
    failed compile never leaves a half-written build (nor destroys the previous one)."""
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A unique name: two compiles of the same pipeline at once (parallel test runs) must not collide.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".fldsl-tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a build folder is meant to be shipped to node hosts
    try:
        result = _emit(program, source, tmp, file)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.build_dir = out
    return result


def _emit(program: Program, source: str, out: Path, file: str) -> CompileResult:
    from fldsl.compiler.manifest import render_node_manifest

    written: dict[str, bytes] = {}

    def write(rel: str, text: str) -> str:
        data = text.encode("utf-8")
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[rel] = data
        return sha256_hex(data)

    t = program.trust
    identities: dict[str, Identity] = {}
    per_node: dict[str, dict[str, str]] = {}
    diags: list[Diagnostic] = []
    for n in program.nodes:
        base = f"nodes/{n.id}"
        plan = lower.plan_for(program, n)
        plan_sha = write(f"{base}/plan.json", dump_json(plan))
        policy_sha = write(f"{base}/policy.json", dump_json(lower.policy_for(program, n)))
        inputs = _manifest_inputs(program, n, plan, plan_sha, policy_sha)
        rendered = render_node_manifest(inputs)
        tmpl_name, toml_name = _manifest_names(n.id)
        write(f"{base}/{tmpl_name}", rendered.template)
        write(f"{base}/{toml_name}", rendered.toml)
        diags += _manifest_errors(rendered.toml, inputs, n.id, file)
        identities[n.id] = Identity(
            mr_enclave=[sim_mr_enclave(rendered.toml.encode("utf-8"))],
            isv_prod_id=t.isv_prod_id,
            isv_svn_min=t.isv_svn,
            debug=t.debug,
            measurement_kind="simulated",
        )
        per_node[n.id] = {}
    if diags:
        raise FldslError(diags)
    pins_text = dump_json(Pins(pipeline=program.pipeline, nodes=dict(sorted(identities.items()))))
    for n in program.nodes:
        write(f"nodes/{n.id}/pins.json", pins_text)
    for rel, data in written.items():
        nid = rel.split("/")[1]
        per_node[nid][rel.split("/", 2)[2]] = sha256_hex(data)

    digest = _digest(program, source, written)

    pf = _pipeline_file(program, digest, identities, per_node)
    write("pipeline.json", dump_json(pf))
    return CompileResult(build_dir=out, digest=digest, files=sorted(written), warnings=program.warnings)


def _manifest_inputs(
    program: Program, n: IRNode, plan: Plan, plan_sha: str, policy_sha: str
) -> ManifestInputs:
    from fldsl.compiler.manifest import ManifestInputs, TrustedFile, node_file_uri

    t = program.trust
    return ManifestInputs(
        pipeline=program.pipeline,
        node_id=n.id,
        enclave_size=t.enclave_size,
        max_threads=t.max_threads,
        isv_prod_id=t.isv_prod_id,
        isv_svn=t.isv_svn,
        debug=t.debug,
        edmm=t.edmm,
        remote_attestation="dcap",
        node_files=[
            TrustedFile(uri=node_file_uri("plan.json"), sha256=plan_sha),
            TrustedFile(uri=node_file_uri("policy.json"), sha256=policy_sha),
        ],
        outputs_encrypted=t.at_rest == "encrypted",
        peer_parties=sorted({p.id.split(".", 1)[0] for p in plan.peers} - {n.id.split(".", 1)[0]}),
    )


def _manifest_errors(toml: str, inputs: ManifestInputs, node_id: str, file: str) -> list[Diagnostic]:
    """The lint errors of one node's rendered manifest (a build with any is refused)."""
    from fldsl.compiler.manifest import lint_context_for
    from fldsl.compiler.manifest_check import validate_manifest

    diags: list[Diagnostic] = []
    for finding in validate_manifest(toml, lint=lint_context_for(inputs)):
        if finding.severity == "error":
            diags.append(
                Diagnostic(
                    "error",
                    f"manifest of node `{node_id}`: {finding.key}: {finding.message} [{finding.code}]",
                    file,
                )
            )
    return diags


def _digest(program: Program, source: str, written: dict[str, bytes]) -> str:
    """The pipeline digest: the source, the stdlib modules it uses and every artifact written."""
    h = hashlib.sha256(b"fldsl-pipeline-digest/1\0")
    h.update(b"source\0" + hashlib.sha256(source.encode()).hexdigest().encode() + b"\n")
    for mod in program.uses:
        h.update(f"stdlib\0{mod}\0{_stdlib_digest(mod)}\n".encode())
    for rel in sorted(written):
        h.update(f"artifact\0{rel}\0{sha256_hex(written[rel])}\n".encode())
    return h.hexdigest()


def _pipeline_file(program: Program, digest: str, identities: dict[str, Identity],
                   per_node: dict[str, dict[str, str]]) -> PipelineFile:
    g = lower.task_graph(program)
    gnodes, gedges = lower.graph_lists(g)
    return PipelineFile(
        pipeline=program.pipeline,
        digest=digest,
        source=program.source_name,
        params=program.params,
        scenario=program.scenario,
        parties=program.party_nodes(),
        nodes=[
            NodeSummary(
                id=n.id,
                party=n.party,
                role=n.role,
                measurement=identities[n.id].mr_enclave[0],
                files=dict(sorted(per_node[n.id].items())),
            )
            for n in program.nodes
        ],
        flows=program.flows,
        graph_nodes=gnodes,
        graph_edges=gedges,
        ir=program.model_dump(mode="json"),
    )


def node_paths(build_dir: Path, node_id: str) -> dict[str, Path]:
    d = node_dir(build_dir, node_id)
    tmpl, toml = _manifest_names(node_id)
    return {
        "plan": d / "plan.json",
        "policy": d / "policy.json",
        "pins": d / "pins.json",
        "template": d / tmpl,
        "toml": d / toml,
    }
