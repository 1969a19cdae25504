"""Builds the Cython registry (src/rollout_sessions/registry/) into
rollout_sessions.registry._registry; its C core is in registry/includes/."""

from Cython.Build import cythonize
from setuptools import Extension, setup

REGISTRY = "src/rollout_sessions/registry"

extensions = [
    Extension(
        "rollout_sessions.registry._registry",
        sources=[f"{REGISTRY}/_registry.pyx"],
        include_dirs=[f"{REGISTRY}/includes"],
        extra_compile_args=["-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
    package_data={
        "rollout_sessions.registry": ["*.pxd", "*.pyi", "includes/*.pxd", "includes/*.h"],
        "rollout_sessions.testing": ["templates/*.jinja"],
    },
)
