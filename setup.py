"""Map the repository's layer folders onto subpackages of ``secapi``.

Each layer keeps its own top-level folder (``core/``, ``api/``,
``operator/``), and all of them install under one import name, so the
``operator/`` folder never shadows the standard library's ``operator``
module. pyproject.toml cannot express a package list built from several
folders, so this file computes it; every other setting lives in
pyproject.toml.
"""

from setuptools import find_packages, setup

LAYERS = {"core": "secapi.core", "api": "secapi.api", "operator": "secapi.operator"}

packages = ["secapi"]
package_dir = {"secapi": "secapi"}
for folder, name in LAYERS.items():
    packages.append(name)
    package_dir[name] = folder
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
