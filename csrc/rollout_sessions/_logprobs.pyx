# cython: language_level=3, boundscheck=False, wraparound=False
"""The answer's token ids and logprobs read into typed arrays, in C.

``read_pairs``: ``meta_info.output_token_logprobs``.

The answer's 800 ``[logprob, token_id, null]`` entries were a large share of
the server's CPU per realistic turn when each became a Python list of three
objects, only to be copied into two arrays (benchmarks/RESULTS.md). This reads the entries straight
from the array's minified JSON, as simdjson writes it after validating the
whole answer, in exactly one shape: ``[[<number>,<digits>,null],...]``.
Anything else (a text instead of ``null``, a fourth element, an id with a
sign, a fraction or past ``max_id``) returns ``None``: the caller's general
path then reads it, and names the defect if there is one.

``narrow_ids``: ``prompt_token_ids``, as simdjson hands them over (int64),
checked against the id range and narrowed to int32 in one pass, with the
GIL held throughout (numpy's reductions on a long prompt let the GIL go,
and the journal's writer thread then takes it from the event loop).

Data work only: what is valid is decided in ``answer``.
"""

from cpython.array cimport array, clone
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.ref cimport PyObject


cdef extern from "Python.h":
    # Locale-independent and correctly rounded, as float() parses.
    # NULL for overflow_exception: past the float range is +-inf, as float() of a
    # huge number literal gives (simdjson refuses those before this is reached).
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception) except? -1.0


cdef array _IDS = array("i")
cdef array _LOGPROBS = array("f")


cdef inline bint _number_char(char c) noexcept nogil:
    return (b"0" <= c <= b"9") or c == b"-" or c == b"+" or c == b"." or c == b"e" or c == b"E"


def read_pairs(bytes text, Py_ssize_t n, long long max_id):
    """``(ids int32, logprobs float32)`` of ``n`` entries in ``text``, or ``None``."""
    cdef const char *s = PyBytes_AS_STRING(text)  # NUL-terminated
    cdef Py_ssize_t size = PyBytes_GET_SIZE(text)
    cdef Py_ssize_t at = 1, start, k
    cdef char *end
    cdef double value
    cdef long long token
    if n < 0 or size < 2 or s[0] != b"[" or s[size - 1] != b"]":
        return None
    cdef array ids = clone(_IDS, n, False)
    cdef array logprobs = clone(_LOGPROBS, n, False)
    for k in range(n):
        if k:  # the separator before every entry but the first
            if s[at] != b",":
                return None
            at += 1
        if s[at] != b"[":
            return None
        # The logprob: a JSON number, as float() reads it.
        start = at = at + 1
        while _number_char(s[at]):
            at += 1
        if at == start or s[at] != b",":
            return None
        try:
            value = PyOS_string_to_double(s + start, &end, NULL)
        except ValueError:
            return None
        if end != s + at:
            return None
        logprobs.data.as_floats[k] = <float>value
        # The token id: digits only, within max_id.
        start = at = at + 1
        token = 0
        while b"0" <= s[at] <= b"9" and at - start < 12:
            token = token * 10 + (s[at] - 48)
            at += 1
        if at == start or token > max_id:
            return None
        ids.data.as_ints[k] = <int>token
        if s[at] != b"," or s[at + 1] != b"n" or s[at + 2] != b"u" or s[at + 3] != b"l" \
                or s[at + 4] != b"l" or s[at + 5] != b"]":
            return None
        at += 6
    if at != size - 1:
        return None
    return ids, logprobs


def narrow_ids(const unsigned char[::1] wide, long long max_id):
    """``wide`` (int64 ids, native order, as bytes) as int32 ids, or ``None``
    if one is negative or past ``max_id``."""
    cdef Py_ssize_t n = wide.shape[0] // sizeof(long long), k
    cdef const long long *values = <const long long *>&wide[0] if n else NULL
    cdef long long token
    cdef array ids = clone(_IDS, n, False)
    for k in range(n):
        token = values[k]
        if token < 0 or token > max_id:
            return None
        ids.data.as_ints[k] = <int>token
    return ids
