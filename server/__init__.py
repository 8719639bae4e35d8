"""The kvtier sidecar: a FastAPI app over one TieredCache (see ``kvtier.server.app.create_app``)."""
