"""`factedit serve`: the HTTP service. OpenAI-compatible generation from the edited model and edits over
HTTP (apply, list, revert, diff, export, import), on FastAPI and uvicorn, around one `EditSession`."""

from .app import create_app
from .config import Limits, ServerConfig

__all__ = ["Limits", "ServerConfig", "create_app"]
