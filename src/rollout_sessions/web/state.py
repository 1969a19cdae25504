"""The state one app instance shares between its routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollout_sessions.config import Settings

if TYPE_CHECKING:
    from rollout_sessions.metrics import Metrics
    from rollout_sessions.sessions.service import Sessions
    from rollout_sessions.tito import Tito
    from rollout_sessions.upstream.client import Upstream
    from rollout_sessions.upstream.controls import Overrides
    from rollout_sessions.web.endpoints import Guard


@dataclass(slots=True)
class AppState:
    # Effective settings: with no upstream configured, ``upstream`` holds the
    # embedded echo backend's URL once the app has started.
    settings: Settings
    sessions: Sessions
    upstream: Upstream
    metrics: Metrics
    instance_id: str
    guard: Guard
    tito: Tito | None = None  # token-in, token-out, when a tokenizer is configured
    overrides: Overrides | None = None  # SAMPLING_OVERRIDES, when there are any

    @property
    def max_trim_tokens(self) -> int:
        return self.tito.max_trim_tokens if self.tito is not None else 0
