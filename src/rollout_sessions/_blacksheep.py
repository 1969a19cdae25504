"""The one place that uses BlackSheep's private API (tested in tests/unit/test_adapters.py).

BlackSheep is pinned below 3; if an upgrade breaks a name used here, that
test says which.

- ``raw_path(request)``: the request target's path as received, undecoded
  (``Request._path``, what BlackSheep's own router matches on);
- ``document_without_binders(endpoint)``: BlackSheep documents a handler's
  parameters only if it carries binders; ours take the bare request, so
  they get an empty binder list (``endpoint.binders``).
"""

from __future__ import annotations

from typing import Any

from blacksheep import Request


def raw_path(request: Request) -> bytes:
    return request._path


def document_without_binders(endpoint: Any) -> None:
    endpoint.binders = []
