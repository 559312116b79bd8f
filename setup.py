# The metadata lives in pyproject.toml. This file stays for tools that predate PEP 660 editable
# installs (pip < 21.3, `python setup.py develop`), which need a setup.py to find.
from setuptools import setup

setup()
