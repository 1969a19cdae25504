"""The kit shared by the tests, the benchmarks, the demo and the CLI: a session
API client (``client``) and server subprocesses (``processes``)."""
