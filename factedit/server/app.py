"""The FastAPI application of `factedit serve`: OpenAI-compatible generation and edits over HTTP.

    session = EditSession(SessionConfig(...))
    app = create_app(session, ServerConfig(token=...))      # uvicorn.run(app) or TestClient(app)

The caller owns the session (and closes it); the app starts the session's generation engine with its
settings and stops it on shutdown.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from .._version import __version__
from ..session.core import EditSession
from . import edit_routes, openai_routes
from .config import ServerConfig
from .errors import install_handlers
from .security import BodySizeLimit, TokenCheck
from .state import ServiceState

UPLOAD_PATHS = ("/v1/edits/import",)


def create_app(session: EditSession, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    session.start_generator(max_batch=config.max_batch, max_pending=config.max_queue)
    session.max_pending_writes = config.max_pending_writes
    state = ServiceState(session, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        session.stop_generator()

    app = FastAPI(title="factedit", version=__version__, lifespan=lifespan,
                  description="Serves an edited causal LM (OpenAI-compatible) and applies, reverts and diffs edits.")
    app.state.factedit = state
    install_handlers(app)
    read_access = TokenCheck(config.token, write=False, open_reads=config.open_reads)
    write_access = TokenCheck(config.token, write=True, open_reads=config.open_reads)
    app.include_router(openai_routes.build_router(read_access))
    app.include_router(edit_routes.build_router(read_access, write_access))
    app.add_middleware(BodySizeLimit, default_bytes=config.limits.max_body_bytes,
                       upload_bytes=config.limits.max_upload_bytes, upload_paths=UPLOAD_PATHS)
    return app
