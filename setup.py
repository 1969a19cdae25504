"""Builds the two Cython extensions from csrc/, whose tree mirrors the modules'
names (Cython finds a module's own .pxd by its qualified name):
csrc/rollout_sessions/registry/ (the Cython layer, its .pxd declarations and the
C core's headers) into rollout_sessions.registry._registry, and
csrc/rollout_sessions/_logprobs.pyx (the answer's logprob reader) into
rollout_sessions._logprobs. Their .pyi stubs stay beside the importable modules
in src/."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "rollout_sessions.registry._registry",
        sources=["csrc/rollout_sessions/registry/_registry.pyx"],
        include_dirs=["csrc/rollout_sessions/registry"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "rollout_sessions._logprobs",
        sources=["csrc/rollout_sessions/_logprobs.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["csrc"],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
    package_data={
        "rollout_sessions": ["*.pyi"],
        "rollout_sessions.registry": ["*.pyi"],
        "rollout_sessions.testing": ["templates/*.jinja"],
    },
)
