"""The kit shared by the tests, the benchmarks, the demo and the CLI: a session
API client (``client``) and server subprocesses (``processes``); small real
tokenizers (``tokenizers``); the soak (``soak``, ``python -m
rollout_sessions.testing.soak``); and the production-shaped reference the
benchmarks and a test compare against (``reference_registry``,
``reference_server``: FastAPI, from the ``test`` extra)."""
