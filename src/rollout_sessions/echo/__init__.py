"""The echo inference backend: a toy chat template (``template``), the
backend app (``backend``) and its command (``cli``)."""

from rollout_sessions.echo.backend import EchoBackend, EchoStats, start_echo_backend
from rollout_sessions.echo.template import completion_tokens, prompt_tokens

__all__ = ["EchoBackend", "EchoStats", "completion_tokens", "prompt_tokens", "start_echo_backend"]
