"""Maps the top-level folders (README.md "Layout": grammar/ compiler/ runtime/ stdlib/ ...) into the single
``fldsl.*`` import namespace.

pyproject.toml holds the metadata; this file exists only because setuptools' declarative config cannot
discover sub-packages under a remapped ``package-dir``.
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
for pkg, folder in {**ROOTS, **{p: f for p, f in OPTIONAL_ROOTS.items() if (here / f).is_dir()}}.items():
    package_dir[pkg] = folder
    packages.append(pkg)
    packages += [f"{pkg}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
