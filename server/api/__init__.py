"""The HTTP API: routers per resource, dependencies, wire schemas and the one place errors become responses."""
