"""Maps the top-level folders (README.md "Layout": grammar/ compiler/ runtime/ stdlib/ ...) into the single
``fldsl.*`` import namespace.

pyproject.toml holds the metadata; this file exists only because setuptools' declarative config cannot
discover sub-packages under a remapped ``package-dir``.
"""

from setuptools import find_packages, setup

ROOTS = {
    "fldsl": "fldsl",
    "fldsl.compiler": "compiler",
    "fldsl.runtime": "runtime",
    "fldsl.stdlib": "stdlib",
    "fldsl.grammar": "grammar",
    "fldsl.pipelines": "pipelines",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for pkg, folder in ROOTS.items():
    package_dir[pkg] = folder
    packages.append(pkg)
    packages += [f"{pkg}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
