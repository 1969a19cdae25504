"""The routes: HTTP adapters of the session service and the upstream."""
