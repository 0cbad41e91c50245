"""The one way tests wait: poll a probe until a condition holds or a deadline passes.

Tests never sleep for a fixed time to let something happen, and never assert that
something took less than N seconds: on a shared 2-core machine both fail at random.
They wait for the event itself, with a deadline generous enough for a loaded machine,
and a timeout says what was last seen.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# The deadline every wait shares unless it has a reason for its own: generous, so
# that a machine under a load of 20+ still makes it. Browser pages use it too
# (conftest.browser_page sets it as each page's and each expect()'s timeout).
DEADLINE_S = 60.0


def wait_until(probe: Callable[[], T], timeout: float = DEADLINE_S, message: str = "condition", *,
               until: Callable[[T], object] = bool, interval: float = 0.05) -> T:
    """Call `probe()` until `until(value)` is true (by default: the value is truthy)
    and return that value. After `timeout` seconds, raise AssertionError naming
    `message` and the last value seen. The probe is always called once more at the
    deadline, so a slow machine that sleeps through it still gets a last look.

    Exceptions from `probe` propagate at once: a probe that can fail while the thing
    it waits for is not there yet must return a value for that case instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}; last seen: {value!r}")
        time.sleep(min(interval, remaining))
