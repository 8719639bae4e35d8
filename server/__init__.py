"""The kvtier sidecar: a FastAPI app over one TieredCache (see ``server.app.create_app``)."""
