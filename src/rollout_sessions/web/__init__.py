"""HTTP plumbing: the app, its routing, request guards, errors, OpenAPI, the server."""
