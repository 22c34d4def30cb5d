"""The editing session shared by the app and the service: one model, its journal and one Editor behind a
readers–writer lock (core.py), and the engine that generates text from the edited model in batches."""

from .access import SessionBusyError
from .config import DEFAULT_PROBES, SessionConfig
from .core import EditOutcome, EditSession, Prediction
from .rwlock import ReadWriteLock

__all__ = ["DEFAULT_PROBES", "EditOutcome", "EditSession", "Prediction", "ReadWriteLock", "SessionBusyError",
           "SessionConfig"]
