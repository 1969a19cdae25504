"""The upstream: the inference backend's client and its answers."""
