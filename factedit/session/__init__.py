"""The editing session shared by the app and the service: one model, its journal and one Editor behind a
readers–writer lock (core.py), and the engine that generates text from the edited model in batches.
(Names load on first use, core/lazy.py: the light modules here, such as limits.py, import alone.)"""

from typing import TYPE_CHECKING

from ..core.lazy import lazy_exports

__all__ = ["DEFAULT_PROBES", "EditOutcome", "EditSession", "Prediction", "ReadWriteLock", "SessionBusyError",
           "SessionConfig"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "SessionBusyError": "access", "DEFAULT_PROBES": "config", "SessionConfig": "config", "EditOutcome": "core",
    "EditSession": "core", "Prediction": "core", "ReadWriteLock": "rwlock",
})

if TYPE_CHECKING:
    from .access import SessionBusyError
    from .config import DEFAULT_PROBES, SessionConfig
    from .core import EditOutcome, EditSession, Prediction
    from .rwlock import ReadWriteLock
