"""The compiled part of the package: the relay's per-message checks (proxy/wire/_cwire.pyx).

Everything else is in pyproject.toml. The extension is optional: where it cannot be
compiled (no C compiler) the install goes on and proxy/wire/fastwire.py uses its
pure-Python twin.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("proxy.wire._cwire", ["proxy/wire/_cwire.pyx"], optional=True)],
        compiler_directives={"language_level": "3"},
    ),
)
