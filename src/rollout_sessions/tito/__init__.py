"""Token-in, token-out: the server builds every prompt's token ids itself.

``prompts`` holds the builder (``Tito``), the family rules and their
detection; ``encoders`` the families whose template is code (DeepSeek);
``jinja`` a chat template compiled once; ``check`` the start-up append-only
report and ``GET /sessions/{id}?tito_check=1``.
"""

from rollout_sessions.tito.prompts import AUTO, RULES, Tito, detect, tito_from_settings

__all__ = ["AUTO", "RULES", "Tito", "detect", "tito_from_settings"]
