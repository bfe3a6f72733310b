"""Running async setup from synchronous fixtures and helpers, shared by the test packages."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_sync(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in a helper thread, so sync fixtures can do
    async setup without touching the event loop pytest-asyncio runs the test on."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(fn()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="fixture-loop")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
