"""Waiting on a condition with a deadline, instead of sleeping and hoping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T | None],
    deadline_s: float,
    what: str = "condition",
    every: float = 0.05,
) -> T:
    """Polls `condition` every `every` seconds until it returns a truthy value, which is
    returned; raises TimeoutError once `deadline_s` seconds have passed without one."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not met within {deadline_s:g}s")
        time.sleep(every)
