"""A global write budget (`--rate N` writes per second): a token bucket shared by all lanes."""

from __future__ import annotations

import time

import anyio


class TokenBucket:
    """`rate` tokens per second, bursts up to `burst`. `take(n)` waits until n are available;
    a batch larger than the burst is let through once the bucket is full (and then owes)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = anyio.Lock()
        self.waited = 0.0

    async def take(self, n: float = 1.0) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= min(n, self.burst):
                    self._tokens -= n
                    return
                wait = (min(n, self.burst) - self._tokens) / self.rate
                self.waited += wait
                await anyio.sleep(wait)
