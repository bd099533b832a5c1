"""The optional compiled kernel (flowscan/_fused.c); everything else is in pyproject.toml.

The kernel is optional: without a C compiler the install still succeeds and flowscan reduces
with numpy (`flowscan formats` says which path is in use)."""

import os

from setuptools import Extension, setup

setup(ext_modules=[Extension("flowscan._fused", ["flowscan/_fused.c"], optional=True,
                             extra_compile_args=["/O2"] if os.name == "nt" else ["-O3", "-Wno-psabi"])])
