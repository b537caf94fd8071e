"""The compiled part of the package: the relay's per-message checks (proxy/wire/_cwire.pyx).

Everything else is in pyproject.toml. The extension is optional: where it cannot be
compiled (no C compiler, no Python headers) the install goes on without it, with a
warning, and proxy/wire/fastwire.py uses its pure-Python twin.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = cythonize(
    [Extension("proxy.wire._cwire", ["proxy/wire/_cwire.pyx"])],
    compiler_directives={"language_level": "3"},
)
for extension in extensions:
    extension.optional = True  # cythonize builds new Extension objects: set it on those

setup(ext_modules=extensions)
