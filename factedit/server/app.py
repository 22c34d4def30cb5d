"""The FastAPI application of `factedit serve`: OpenAI-compatible generation and edits over HTTP.

    session = EditSession(SessionConfig(...))
    app = create_app(session, ServerConfig(token=...))      # uvicorn.run(app) or TestClient(app)

The caller owns the session (and closes it); the app starts the session's generation engine with its
settings, gives the session the server's edit limits, and stops the engine on shutdown.

Middleware, outermost first: the token (access.py, from the headers alone), requests in flight, the
body's deadline (connections.py), the body's size (security.py). The header and keep-alive timeouts
are uvicorn's side (`factedit serve`, cli.py).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from .._version import __version__
from ..session.core import EditSession
from . import edit_routes, openai_routes
from .access import TokenGate
from .config import ServerConfig
from .connections import BodyTimeout, InFlightLimit
from .errors import install_handlers
from .security import BodySizeLimit
from .state import ServiceState

UPLOAD_PATHS = ("/v1/edits/import",)
HEALTH_PATH = "/v1/health"  # always answered: never counted against the requests in flight


def build_routers() -> list[APIRouter]:
    """The API's routers, in the order the app includes them (without a further prefix: their routes'
    paths are the app's)."""
    return [openai_routes.build_router(), edit_routes.build_router()]


def create_app(session: EditSession, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    session.start_generator(max_batch=config.max_batch, max_pending=config.max_queue)
    session.access.max_pending_writes = config.max_pending_writes
    session.request_limits = config.limits.request_limits()  # for every edit and import, however it comes
    state = ServiceState(session, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        session.stop_generator()

    app = FastAPI(title="factedit", version=__version__, lifespan=lifespan,
                  description="Serves an edited causal LM (OpenAI-compatible) and applies, reverts and diffs edits.")
    app.state.factedit = state
    install_handlers(app)
    routers = build_routers()
    for router in routers:
        app.include_router(router)
    # add_middleware wraps what is there: the last added runs first.
    app.add_middleware(BodySizeLimit, default_bytes=config.limits.max_body_bytes,
                       upload_bytes=config.limits.max_upload_bytes, upload_paths=UPLOAD_PATHS)
    app.add_middleware(BodyTimeout, seconds=config.body_timeout_s)
    app.add_middleware(InFlightLimit, limit=config.max_in_flight, exempt=(HEALTH_PATH,))
    docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    # The gate matches the routers' own routes: FastAPI may keep an included router whole (not its routes)
    # in app.routes.
    app.add_middleware(TokenGate, routes=[route for router in routers for route in router.routes],
                       open_paths=[p for p in docs if p], token=config.token, open_reads=config.open_reads)
    return app
