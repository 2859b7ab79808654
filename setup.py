"""Maps the top-level folders (README.md "Layout": grammar/ compiler/ runtime/ stdlib/ ...) into the single
``fldsl.*`` import namespace.

pyproject.toml holds the metadata; this file exists only because setuptools' declarative config cannot
discover sub-packages under a remapped ``package-dir``.

The links ``fldsl/compiler -> ../compiler`` (and runtime, stdlib, grammar, pipelines, bench -> ../benchkit)
are for tools that read the source tree (mypy, ruff, editors): they resolve ``fldsl.compiler`` like any
package. Installs do not use them: the mapping below is explicit, so an editable install imports the real
folders (the files a Gramine manifest trusts, no symlinked paths) and a wheel copies them once; walking
``fldsl/`` skips the links (find_packages would follow them and list every sub-package twice).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOTS = {
    "fldsl": "fldsl",
    "fldsl.compiler": "compiler",
    "fldsl.runtime": "runtime",
    "fldsl.stdlib": "stdlib",
    "fldsl.grammar": "grammar",
    "fldsl.pipelines": "pipelines",
}
# Installed where the folder is present: a checkout has it, the node image (Dockerfile) copies the package
# folders above only, so it carries no bench code (plain mode, the Flower baseline).
OPTIONAL_ROOTS = {"fldsl.bench": "benchkit"}

packages: list[str] = []
package_dir: dict[str, str] = {}
here = Path(__file__).resolve().parent
roots = {**ROOTS, **{p: f for p, f in OPTIONAL_ROOTS.items() if (here / f).is_dir()}}
# fldsl/compiler etc. are the tool links (module docstring): their packages come from their own folders.
linked = [p.split(".", 1)[1] for p in (*ROOTS, *OPTIONAL_ROOTS) if p != "fldsl"]
for pkg, folder in roots.items():
    package_dir[pkg] = folder
    packages.append(pkg)
    skip = [*linked, *(f"{n}.*" for n in linked)] if pkg == "fldsl" else []
    packages += [f"{pkg}.{sub}" for sub in find_packages(folder, exclude=skip)]

setup(packages=packages, package_dir=package_dir)
