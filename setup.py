"""Builds the optional C++ (CPU) and CUDA extensions in csrc/ (see csrc/README.md).

Without csrc sources, or with DVAE_KERNELS_BUILD_CPU=0 DVAE_KERNELS_BUILD_CUDA=0, this is a
plain pure-Python install: the package works through its triton and torch backends.
"""

from setuptools import setup

setup()
