"""The Ray Serve query service: embed once, fan out across shards, merge.

    from raysearch.serve import ServeConfig, build_app, start_service

Importing this package starts nothing and imports neither Ray nor FastAPI; `build_app` composes the
deployments (`deployments.py`) and `start_service` runs them.
"""

from raysearch.serve.config import ServeConfig


def __getattr__(name: str):
    # Lazy: `raysearch.serve.build_app` pulls in Ray Serve only when asked for.
    if name in ("build_app", "app_builder", "start_service", "service_url"):
        from raysearch.serve import app

        return getattr(app, name)
    if name in ("SearchClient", "ServiceError"):
        from raysearch.serve import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["SearchClient", "ServeConfig", "ServiceError", "app_builder", "build_app", "service_url", "start_service"]
