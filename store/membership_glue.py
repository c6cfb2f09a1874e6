"""Joining a space through the controller (filled in once ``store.membership`` lands)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from store.api import Space


@asynccontextmanager
async def join_space(
    controller: str, listen: str, secret: bytes, options: dict[str, Any]
) -> AsyncIterator[Space]:
    raise NotImplementedError("joining through a controller is not wired yet")
    yield  # pragma: no cover
