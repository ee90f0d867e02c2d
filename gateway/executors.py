"""Work handed to a thread pool from the event loop, which its shutdown cannot leave hanging."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ExecutorShutDown(RuntimeError):
    """The executor was shut down before its thread took the work (or before it was asked)."""


async def run_in(executor: Executor, name: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on ``executor``. A run its shutdown cancelled before a thread took it
    (``Runtime.aclose``: ``cancel_futures``) reaches the awaiting task as a CancelledError,
    which would end it answering nobody: it is an ``ExecutorShutDown`` here, as a run asked
    after the shutdown is. A cancel of the awaiting task itself still passes."""
    try:
        work = executor.submit(fn, *args)
    except RuntimeError as exc:  # asked after the shutdown
        raise ExecutorShutDown(f"the {name} executor shut down") from exc
    try:
        return await asyncio.wrap_future(work)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if work.cancelled() and (task is None or not task.cancelling()):
            raise ExecutorShutDown(f"the {name} executor shut down") from None
        raise
