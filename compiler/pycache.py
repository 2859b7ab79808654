"""Bytecode for the enclave, compiled at sign time (``fldsl compile --sign``).

Inside Gramine every file reports mtime 0, so the timestamp-based ``.pyc`` files pip and Python leave next to
the sources always look stale: the node would compile TensorFlow's Python from source at every start (and
could not write the result: the files are read-only). Instead the entrypoint interpreter compiles every
trusted ``.py`` once into ``<build>/pycache/`` as *unchecked-hash* bytecode (PEP 552: no timestamp, no
source check), laid out for ``python -X pycache_prefix=/fldsl/pycache``. Each ``.pyc`` is itself a trusted
file, hashed into the signed manifest, so running it is as safe as running the measured source, and the
bytes do not depend on the machine or the time of signing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

PYCACHE_DIR = "pycache"  # in the build folder; mounted at /fldsl/pycache
ENCLAVE_PYCACHE = "/fldsl/pycache"
COMPILE_TIMEOUT_S = 1200

# Runs in the entrypoint interpreter (its magic number and cache tag are the ones that count).
_SCRIPT = r"""
import importlib.util, json, os, py_compile, sys
from concurrent.futures import ProcessPoolExecutor

def one(src):
    cfile = importlib.util.cache_from_source(src)
    try:
        py_compile.compile(src, cfile=cfile, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except (py_compile.PyCompileError, SyntaxError, ValueError, OSError):
        return None  # not valid Python 3 (a template, a py2 leftover): imported from source, if ever
    return os.path.relpath(cfile, sys.pycache_prefix)

sources = json.load(sys.stdin)
with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    done = [r for r in pool.map(one, sources, chunksize=64) if r]
json.dump(sorted(done), sys.stdout)
"""


class PycacheError(Exception):
    """Bytecode could not be compiled; the message is meant for the user."""


def build_pycache(entrypoint: str, sources: list[str], dest: Path) -> list[str]:
    """Compile ``sources`` with ``entrypoint`` into ``dest``; returns the .pyc paths relative to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [entrypoint, "-I", "-X", f"pycache_prefix={dest.resolve()}", "-c", _SCRIPT],
            input=json.dumps([s for s in sources if s.endswith(".py")]),
            capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise PycacheError(f"cannot compile bytecode with {entrypoint}: {e}") from None
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise PycacheError(f"{entrypoint} could not compile the enclave's bytecode: {tail}")
    try:
        return [str(p) for p in json.loads(proc.stdout)]
    except ValueError as e:
        raise PycacheError(f"bytecode compiler printed no JSON: {e}") from None
