"""What the routes share: the session, its generator and the server's settings (on `app.state`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from ..session.core import EditSession
from ..session.generation import BatchGenerator
from .config import ServerConfig
from .fairshare import FairShare


@dataclass
class ServiceState:
    session: EditSession
    config: ServerConfig
    started: int = field(default_factory=lambda: int(time.time()))
    shares: FairShare = field(init=False)  # each client's share of the generation queue

    def __post_init__(self) -> None:
        self.shares = FairShare(self.config.max_queue_per_client)

    @property
    def generator(self) -> BatchGenerator:
        return self.session.generator

    @property
    def model_name(self) -> str:
        """The name clients give as `model`: the session's model id ("default" for the embedded one)."""
        return self.session.model_id


def service_state(request: Request) -> ServiceState:
    return request.app.state.factedit


StateDep = Annotated[ServiceState, Depends(service_state)]  # a route parameter: the shared state
