"""Build script. The C++/CUDA extensions are added by csrc/ (see the csrc issue)."""
from setuptools import setup

setup()
