"""Package discovery for setuptools (everything else is in pyproject.toml).

dsl/, passes/ and backends/ sit at the top of the tree but install as mocompile.dsl,
mocompile.passes and mocompile.backends. setuptools cannot discover packages through such a
mapping from pyproject.toml alone, and a hand-written list silently drops any subpackage
nobody added to it (an editable install still finds it, a wheel does not), so the list is
computed here from the folders themselves. tests/test_packaging.py builds the wheel and
imports every module from it.
"""

from setuptools import find_packages, setup

MAPPED = {"mocompile.dsl": "dsl", "mocompile.passes": "passes", "mocompile.backends": "backends"}

packages = find_packages(include=["mocompile", "mocompile.*"])
for package, folder in MAPPED.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=MAPPED)
