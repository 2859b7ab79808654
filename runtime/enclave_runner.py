"""How the launcher starts a node inside Gramine: ``fldsl run --enclave gramine-direct|gramine-sgx``.

A signed node (``fldsl compile --sign``) has ``<node>.manifest`` (what ``gramine-direct`` runs),
``<node>.manifest.sgx`` and ``<node>.sig`` (what ``gramine-sgx`` runs) in its build folder. The manifest's
host URIs are relative to the node's working folder, which this module lays out per run::

    <run-dir>/enclave/<node>/     the working folder (cwd of gramine-direct / gramine-sgx)
        node  -> <build>/nodes/<node>/     plan, policy (trusted, hash checked), pins, manifest, .sig
        run   -> <run-dir>/                addresses.json in; sealed checkpoints and models out
        trust -> <trust-dir>/              simulated attestation material (sim backend)
        pycache -> <build>/pycache/        bytecode compiled and hashed at sign time
        data  -> DIR (--data-dir NODE=DIR)  csv data as Gramine encrypted files (an empty folder without)

The node's command line is fixed by the manifest, so the launcher passes nothing but the manifest's path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from fldsl.artifacts import FILE_READERS, Pins, Plan, load_model, node_dir

Enclave = Literal["none", "gramine-direct", "gramine-sgx"]
ENCLAVES: tuple[Enclave, ...] = ("none", "gramine-direct", "gramine-sgx")
ENCLAVE_RUN_DIR = "/fldsl/run"  # the node's --run-dir inside (the manifest's argv)


class EnclaveError(Exception):
    """The build cannot run under the asked runner; the message says what to do. ``exit_code`` follows the
    CLI (2 input, 4 environment)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def manifest_stem(ndir: Path) -> str:
    """``trainer`` for ``nodes/media.trainer/trainer.manifest.template``."""
    templates = sorted(ndir.glob("*.manifest.template"))
    if len(templates) != 1:
        raise EnclaveError(f"{ndir}: expected one *.manifest.template; recompile the pipeline")
    return templates[0].name.removesuffix(".manifest.template")


def is_signed(build_dir: Path, ids: list[str]) -> bool:
    """Every node pinned with a real SGX identity (``fldsl compile --sign``)."""
    pins = load_model(Pins, node_dir(build_dir, ids[0]) / "pins.json")
    return all(pins.nodes[i].measurement_kind == "sgx" for i in ids if i in pins.nodes)


def check_runnable(build_dir: Path, ids: list[str], enclave: Enclave) -> None:
    """Refuse, with the command to run, a build that cannot run under ``enclave``."""
    signed = is_signed(build_dir, ids)
    if enclave == "none":
        if signed:
            raise EnclaveError(
                f"{build_dir} is signed for Gramine (fldsl compile --sign): its peers pin the signed "
                "enclaves, so its nodes must run inside them: add --enclave gramine-direct (or gramine-sgx "
                "on SGX hardware), or compile again without --sign to run without an enclave")
        return
    tool = enclave
    if shutil.which(tool) is None:
        raise EnclaveError(f"--enclave {enclave} needs `{tool}` on PATH (install Gramine v1.9)", 4)
    if not signed:
        raise EnclaveError(
            f"{build_dir} is not signed: sign it first, e.g. with a party's simulated signing key\n"
            f"  fldsl trust init --party PARTY\n"
            f"  fldsl compile PIPELINE.flp -o {build_dir} --sign .fldsl/trust/PARTY/enclave_signing.key\n"
            f"then run it again with --enclave {enclave}")
    for nid in ids:
        ndir = node_dir(build_dir, nid)
        stem = manifest_stem(ndir)
        needed = [f"{stem}.manifest", f"{stem}.sig"]
        if tool == "gramine-sgx":
            needed.append(f"{stem}.manifest.sgx")
        missing = [n for n in needed if not (ndir / n).is_file()]
        if missing:
            raise EnclaveError(f"{ndir}: {', '.join(missing)} missing; sign the build again (--sign KEY)")
    changed = changed_trusted_files(build_dir, ids)
    if changed:
        more = f"\n  … and {len(changed) - 10} more" if len(changed) > 10 else ""
        raise EnclaveError(
            f"{len(changed)} trusted file(s) changed since the build was signed; the enclave would refuse "
            "them:\n  " + "\n  ".join(changed[:10]) + more + "\nsign the build again (fldsl compile "
            "PIPELINE.flp --sign KEY) to trust the new content", 3)


def _sha256_file(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def changed_trusted_files(build_dir: Path, ids: list[str]) -> list[str]:
    """Trusted files whose content differs from the hash signed into a node's manifest, as
    ``"PATH (why)"``, sorted. Gramine refuses such a file when the enclave opens it, but the enclave can
    only say a directory listing or an import failed; this says which file, before anything starts."""
    wanted: dict[str, str] = {}
    for nid in ids:
        ndir = node_dir(build_dir, nid).resolve()
        manifest = ndir / f"{manifest_stem(ndir)}.manifest"
        try:
            doc = tomllib.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise EnclaveError(f"{manifest}: unreadable signed manifest ({e}); sign the build again") \
                from None
        for entry in doc.get("sgx", {}).get("trusted_files", []):
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                continue
            uri = str(entry.get("uri", ""))
            path = uri.removeprefix("file:")
            if path.startswith("node/"):  # relative to the working folder, where node/ is this node's folder
                path = str(ndir / path.removeprefix("node/"))
            elif path.startswith("pycache/"):
                path = str(build_dir.resolve() / path)
            wanted[path] = entry["sha256"]
    paths = sorted(wanted)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        got = dict(zip(paths, pool.map(_sha256_file, paths), strict=True))
    out = []
    for p in paths:
        have = got[p]
        if have is None:
            out.append(f"{p} (missing or unreadable)")
        elif have != wanted[p]:
            out.append(f"{p} (sha256 {have[:16]}…, signed {wanted[p][:16]}…)")
    return out


def csv_files(build_dir: Path, nid: str) -> list[str]:
    """The file names a node opens under /fldsl/data: those of its plan's csv paths."""
    plan = load_model(Plan, node_dir(build_dir, nid) / "plan.json")
    return [Path(ds.path or "").name for ds in plan.data if ds.reader in FILE_READERS]


def check_data_inputs(build_dir: Path, ids: list[str], enclave: Enclave, data_dirs: dict[str, Path],
                      key_services: dict[str, str]) -> None:
    """Refuse, before anything starts, data folders and key services the run would not use or that cannot
    work: inside an enclave every node with csv data needs both, and its folder must hold every csv file by
    the name the node opens (``/fldsl/data/<file name of the plan's path>``)."""
    given = set(data_dirs) | set(key_services)
    if enclave == "none":
        if given:
            raise EnclaveError("--data-dir and --key-service are for --enclave runs (encrypted data inside "
                               "Gramine); without an enclave a node reads the csv path in its plan")
        return
    unknown = sorted(given - set(ids))
    if unknown:
        raise EnclaveError(f"--data-dir/--key-service: no node {', '.join(unknown)} in {build_dir} "
                           f"(nodes: {', '.join(ids)})")
    for nid in ids:
        files = csv_files(build_dir, nid)
        if not files:
            if nid in given:
                raise EnclaveError(f"{nid} reads no csv data: --data-dir/--key-service would be unused")
            continue
        missing = [flag for flag, table in (("--data-dir", data_dirs), ("--key-service", key_services))
                   if nid not in table]
        if missing:
            raise EnclaveError(f"{nid} reads csv data ({', '.join(files)}), which inside the enclave is "
                               f"Gramine-encrypted: add {' and '.join(f'{m} {nid}=...' for m in missing)} "
                               "(docs/keys.md, \"Encrypted data, end to end\")")
        folder = data_dirs[nid]
        if not folder.is_dir():
            raise EnclaveError(f"--data-dir {nid}={folder}: not a folder")
        absent = [f for f in files if not (folder / f).is_file()]
        if absent:
            raise EnclaveError(f"--data-dir {nid}={folder} has no {', '.join(absent)}: the node opens "
                               f"/fldsl/data/<file name>; make it with `fldsl data encrypt PLAIN --key KEY "
                               f"-o {folder}/`")


def host_path(enclave_path: str, run_dir: Path) -> str:
    """Where a file the node wrote under /fldsl/run is on the host."""
    prefix = ENCLAVE_RUN_DIR + "/"
    if enclave_path.startswith(prefix):
        return str(run_dir / enclave_path.removeprefix(prefix))
    return enclave_path


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        if link.is_dir() and not link.is_symlink():
            link.rmdir()  # an earlier run's empty data/ (a non-empty one is not ours to delete: OSError)
        else:
            link.unlink()
    link.symlink_to(target, target_is_directory=True)


def prepare(build_dir: Path, nid: str, run_dir: Path, trust_dir: Path, enclave: Enclave,
            data_dir: Path | None = None) -> tuple[list[str], Path]:
    """Lay out the node's working folder; return (command, cwd)."""
    ndir = node_dir(build_dir, nid).resolve()
    work = run_dir / "enclave" / nid
    work.mkdir(parents=True, exist_ok=True)
    _link(work / "node", ndir)
    _link(work / "run", run_dir.resolve())
    _link(work / "trust", trust_dir.resolve())
    _link(work / "pycache", (build_dir / "pycache").resolve())
    if data_dir is not None:
        _link(work / "data", data_dir.resolve())
    else:
        if (work / "data").is_symlink():  # an earlier run's --data-dir: not this run's data
            (work / "data").unlink()
        (work / "data").mkdir(exist_ok=True)
    return [enclave, str(ndir / manifest_stem(ndir))], work
