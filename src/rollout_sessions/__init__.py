"""rollout-sessions: a session server for agentic RL rollouts."""

__version__ = "0.1.0"
