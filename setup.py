"""Builds the Cython modules: the registry (src/rollout_sessions/registry/) into
rollout_sessions.registry._registry, its C core in registry/includes/; and the
answer's logprob reader, rollout_sessions._logprobs."""

from Cython.Build import cythonize
from setuptools import Extension, setup

REGISTRY = "src/rollout_sessions/registry"

extensions = [
    Extension(
        "rollout_sessions.registry._registry",
        sources=[f"{REGISTRY}/_registry.pyx"],
        include_dirs=[f"{REGISTRY}/includes"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "rollout_sessions._logprobs",
        sources=["src/rollout_sessions/_logprobs.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
    package_data={
        "rollout_sessions": ["*.pyi"],
        "rollout_sessions.registry": ["*.pxd", "*.pyi", "includes/*.pxd", "includes/*.h"],
        "rollout_sessions.testing": ["templates/*.jinja"],
    },
)
