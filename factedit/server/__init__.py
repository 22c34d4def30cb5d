"""`factedit serve`: the HTTP service. OpenAI-compatible generation from the edited model and edits over
HTTP (apply, list, revert, diff, export, import), on FastAPI and uvicorn, around one `EditSession`.
(Names load on first use, core/lazy.py: `factedit --help` reads the serve options without the HTTP stack.)"""

from typing import TYPE_CHECKING

from ..core.lazy import lazy_exports

__all__ = ["Limits", "ServerConfig", "create_app"]

__getattr__, __dir__ = lazy_exports(__name__, {"create_app": "app", "Limits": "config", "ServerConfig": "config"})

if TYPE_CHECKING:
    from .app import create_app
    from .config import Limits, ServerConfig
