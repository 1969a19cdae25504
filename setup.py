"""Builds the Cython registry (csrc/) into rollout_sessions._registry."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "rollout_sessions._registry",
        sources=["csrc/_registry.pyx"],
        include_dirs=["csrc"],
        extra_compile_args=["-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src", "csrc"],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )
)
