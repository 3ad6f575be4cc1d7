"""Graceful shutdown: a uvicorn server that drains (503 + Retry-After to new requests) before it exits."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn

from prefixtune.serving.app import Server, create_app

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains instead of closing the listener: new requests
    get 503 (Retry-After) and /health says "draining" while in-flight requests finish, for at
    most --drain-timeout seconds (then the rest are cancelled and answered 503); then uvicorn
    exits normally (status 0). A second signal exits at once."""

    def __init__(self, server: Server, **options: Any) -> None:
        super().__init__(uvicorn.Config(create_app(server), timeout_graceful_shutdown=10,
                                        **options))  # fmt: skip
        self.app_server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """The signal handler (uvicorn installs it for SIGINT/SIGTERM)."""
        if self._drain is not None or self._loop is None:
            self.should_exit = self.force_exit = True  # a second signal: stop now
            return
        log.info("signal %d: draining (at most %.0f s; signal again to stop now)", sig,
                 self.app_server.config.drain_timeout)  # fmt: skip
        self.begin_drain()

    def begin_drain(self) -> None:
        """Start the drain; safe from any thread or a signal handler."""
        if self._loop is None:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """Refuse new requests, wait for in-flight ones (up to --drain-timeout), cancel the
        rest, then let uvicorn shut down."""
        server = self.app_server
        server.draining = True
        deadline = time.monotonic() + server.config.drain_timeout
        while server.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if server.in_flight:
            log.warning("drain timeout: cancelling %d requests (answered 503)", server.in_flight)
            if server.stopping is not None:
                server.stopping.set()
            deadline = time.monotonic() + 5.0
            while server.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.should_exit = True
