"""Only the optional C scanner lives here; everything else is declared in setup.cfg.

``optional=True``: on a machine without a C compiler the build goes on without it and
mailplat.linescan uses its Python versions (same behaviour, slower on large messages).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mailplat._linescan", ["mailplat/_linescan.c"], optional=True)])
