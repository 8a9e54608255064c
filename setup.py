"""Build the scan's native helper (w2wkit/_native/scan.c, loaded by w2wkit/native.py).

Everything else is in pyproject.toml. The helper is optional: where it does not build
(no C compiler, not POSIX), the install goes on and the scan runs its Python path.
"""

import sys

from setuptools import Extension, setup

ext = []
if sys.platform != "win32":
    ext.append(
        Extension(
            "w2wkit._scan",
            sources=["w2wkit/_native/scan.c"],
            extra_compile_args=["-O3", "-std=gnu99"],
            optional=True,
        )
    )

setup(ext_modules=ext)
