"""Run *inside* a node's interpreter (``python3 -I -m fldsl.compiler.enclave_probe``): print, as JSON, the
files that interpreter needs to run an fldsl node, so :mod:`fldsl.compiler.enclave_files` can trust exactly
those in the node's Gramine manifest.

It answers for the interpreter that will run in the enclave, which need not be the one that compiles
(``fldsl compile --sign --entrypoint /srv/venv/bin/python3``). Standard library only, plus
``importlib.metadata`` and ``packaging`` (a TensorFlow dependency), so it runs in any environment where the
fldsl runtime is installed. What it lists, and what it leaves out:

- the standard library's modules and extension modules, without its test suites, IDLE, Tk and the other
  parts a node never imports;
- every file of the distributions in fldsl's runtime dependency closure (extras excluded), without C/C++
  headers, stub files and test folders;
- no bytecode (see ``_keep``);
- fldsl's own code, walked from the imported packages' folders, so an editable install (whose RECORD names
  only a path hook) is listed exactly like a regular one;
- ``pyvenv.cfg`` of a virtual environment (without it Python cannot find the venv's site-packages).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import sys
import sysconfig
from pathlib import Path

# Standard-library folders a node never imports (and that hold most of its files).
STDLIB_SKIP_DIRS = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
    "dist-packages", "__phello__", "pydoc_data", "venv",
})
STDLIB_SKIP_EXTENSIONS = ("_test", "xxlimited", "_xxtestfuzz", "_ctypes_test", "_tkinter")
# Distribution content that is never executed.
SKIP_SUFFIXES = (".h", ".hpp", ".hh", ".inc", ".pyi", ".c", ".cc", ".cpp", ".cu", ".cmake", ".pxd", ".pyx",
                 ".a", ".la", ".typed")
# Not "test": tensorflow._api.v2.__internal__.test is imported by `import tensorflow`.
SKIP_DIR_NAMES = frozenset({"tests", "include", "__pycache__"})
FLDSL_PACKAGES = (
    "fldsl", "fldsl.compiler", "fldsl.runtime", "fldsl.stdlib", "fldsl.grammar", "fldsl.pipelines",
)
# Package data fldsl ships (pyproject's package-data) and its code.
FLDSL_SUFFIXES = (".py", ".lark", ".j2", ".flp", ".proto", ".json", ".toml")


def _keep(rel_parts: tuple[str, ...]) -> bool:
    # No bytecode: Gramine reports every file's mtime as 0, so timestamp-based .pyc files next to the
    # sources always look stale inside; fldsl compiles its own (fldsl.compiler.pycache) at sign time.
    name = rel_parts[-1]
    if name.endswith(SKIP_SUFFIXES) or name.endswith(".pyc"):
        return False
    return not any(d in SKIP_DIR_NAMES for d in rel_parts[:-1])


def stdlib_files() -> list[str]:
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["platstdlib"]}
    out: set[str] = set()
    for root in sorted(roots):
        base = Path(root)
        for dirpath, dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(base).parts
            if rel and (rel[0] in STDLIB_SKIP_DIRS or rel[0].startswith("config-")):
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
            for f in filenames:
                p = Path(dirpath) / f
                if f.endswith(".py"):
                    out.add(str(p))
                elif f.endswith(".so") and not f.startswith(STDLIB_SKIP_EXTENSIONS):
                    out.add(str(p))
    return sorted(out)


# Requirements of TensorFlow that a node never imports, left out of the enclave (not mounted, not trusted):
# each is either imported only behind `try: ... except ImportError` or only by tools fldsl does not run.
# tests/enclave proves the nodes train without them.
NOT_IN_ENCLAVE = {
    "h5py": "Keras HDF5 saving; TensorFlow's legacy Keras imports it only if present (9 s under Gramine)",
    "keras": "Keras 3, loaded lazily on `tf.keras`, which fldsl's Keras-free segments never touch",
    "libclang": "TensorFlow's code generators, never imported at run time",
    "setuptools": "packaging tooling (its distutils shim is a .pth that runs code at start-up)",
    "wheel": "packaging tooling",
}


def _requirement_names(dist: md.Distribution) -> list[str]:
    from packaging.requirements import Requirement

    names = []
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra or another platform's dependency
        names.append(req.name)
    return names


def dependency_closure(root: str) -> list[md.Distribution]:
    from packaging.utils import canonicalize_name

    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in NOT_IN_ENCLAVE:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional runtime dependency that is not installed: nothing to trust
        seen[name] = dist
        todo.extend(_requirement_names(dist))
    return [seen[k] for k in sorted(seen)]


def distribution_files(dist: md.Distribution) -> list[str]:
    base = Path(str(dist.locate_file(""))).resolve()
    out = []
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if ".." in parts:  # console scripts in bin/: not imported
            continue
        if not _keep(parts):
            continue
        p = base / Path(str(f))
        if p.is_file():
            out.append(str(p))
    return out


def fldsl_files() -> tuple[list[str], list[str]]:
    """fldsl's code files and the folders they live in (walked like fldsl.measurement.code_digest)."""
    files: set[str] = set()
    roots: list[str] = []
    for name in FLDSL_PACKAGES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        # Where the import system found it, links included (a checkout's fldsl/runtime -> ../runtime): the
        # paths the interpreter opens are the ones Gramine must trust and the bytecode is compiled for.
        root = Path(os.path.abspath(str(mod.__file__))).parent
        roots.append(str(root))
        for p in root.rglob("*"):
            rel = p.relative_to(root).parts
            if p.is_file() and _keep(rel) and p.suffix in FLDSL_SUFFIXES:
                files.add(str(p))
    return sorted(files), sorted(set(roots))


def top_level_entries(dist: md.Distribution) -> set[str]:
    """The names a distribution puts directly into its site folder (package folders, modules, .pth, its
    dist-info): what the enclave mounts, so that it sees these and nothing else installed beside them."""
    base = Path(str(dist.locate_file(""))).resolve()
    out = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and ".." not in parts and parts[0] != "__pycache__":
            out.add(str(base / parts[0]))
    return out


def probe() -> dict[str, object]:
    files: set[str] = set(stdlib_files())
    site_dir = Path(sysconfig.get_paths()["purelib"]).resolve()
    dists = dependency_closure("fldsl")
    # Mounted one by one: a package installed beside the runtime's (a test runner, grpc_tools) stays
    # invisible inside, so an optional `try: import x` finds nothing instead of an untrusted file.
    # (.pth files of other distributions stay unmounted too: site.py never sees them.)
    mounts: set[str] = {sys.base_prefix}
    for dist in dists:
        mounts |= top_level_entries(dist)
        if dist.metadata["Name"].lower() != "fldsl":
            files.update(distribution_files(dist))
    own, roots = fldsl_files()
    files.update(own)
    mounts.update(roots)
    # The fldsl distribution itself: its metadata and, for an editable install, the path hook (.pth +
    # finder module) that maps fldsl.compiler & co. to their source folders.
    fldsl_dist = md.distribution("fldsl")
    files.update(distribution_files(fldsl_dist))
    # Path-only .pth files (layered environments) keep their meaning inside; a .pth that runs code is
    # trusted only when a runtime distribution ships it (then it is among the mounts above already).
    for pth in site_dir.glob("*.pth"):
        lines = pth.read_text(encoding="utf-8", errors="replace").splitlines()
        if not any(line.startswith(("import ", "import\t")) for line in lines):
            files.add(str(pth))
            mounts.add(str(pth))
    if sys.prefix != sys.base_prefix:  # a venv: its interpreter link and pyvenv.cfg, not the whole folder
        mounts.add(sys.executable)
        pyvenv = Path(sys.prefix) / "pyvenv.cfg"
        if pyvenv.is_file():
            files.add(str(pyvenv))
            mounts.add(str(pyvenv))
    else:
        mounts.add(sys.prefix)
    return {
        "executable": sys.executable,
        "real_executable": os.path.realpath(sys.executable),
        "prefix": sys.prefix,
        "cache_tag": sys.implementation.cache_tag,
        "base_prefix": sys.base_prefix,
        "site_packages": str(site_dir),
        "fldsl_roots": roots,
        "mounts": sorted(m for m in mounts if os.path.exists(m)),
        "distributions": sorted(f"{d.metadata['Name']}=={d.version}" for d in dists),
        "files": sorted(files),
    }


if __name__ == "__main__":
    json.dump(probe(), sys.stdout)
