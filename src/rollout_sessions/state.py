"""The state one app instance shares between its routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollout_sessions.config import Settings

if TYPE_CHECKING:
    from rollout_sessions.controls import InFlight, Overrides
    from rollout_sessions.journal import Journal
    from rollout_sessions.metrics import Metrics
    from rollout_sessions.registry import Registry
    from rollout_sessions.tito import Tito
    from rollout_sessions.upstream import Upstream
    from rollout_sessions.web import Guard


@dataclass(slots=True)
class AppState:
    # Effective settings: with no upstream configured, ``upstream`` holds the
    # embedded echo backend's URL once the app has started.
    settings: Settings
    registry: Registry
    upstream: Upstream
    metrics: Metrics
    instance_id: str
    guard: Guard
    journal: Journal | None = None  # None: memory only
    tito: Tito | None = None  # token-in, token-out, when a tokenizer is configured
    overrides: Overrides | None = None  # SAMPLING_OVERRIDES, when there are any
    inflight: InFlight | None = None  # upstream calls a DELETE cancels (CANCEL_ON_DELETE)

    @property
    def max_trim_tokens(self) -> int:
        return self.tito.max_trim_tokens if self.tito is not None else 0
