"""The package version, written once: pyproject.toml reads it (setuptools dynamic version) and
`bimi --version` prints it without importing torch."""
__version__ = "0.1.0"
