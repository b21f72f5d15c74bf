"""The package version, written only here: pyproject.toml reads it without importing the package
(setuptools dynamic version), `bimi_kernels.__version__` and `bimi --version` import it."""
__version__ = "0.1.0"
