"""Binance's IP request-weight limit, as a small object each Binance venue owns (spot.py, usdm.py).

Weight is counted per clock window (a minute on Binance) and reported in `X-MBX-USED-WEIGHT-1M`. Over the limit:
HTTP 429 with Retry-After = the seconds to the window's end. A client that keeps calling after `ban_after_429s`
429s in one window is banned: HTTP 418 with Retry-After = the ban; every request is refused until the ban ends,
and each further ban doubles, up to 3 days.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """What to answer: `status` 200 means go on and serve; otherwise an error with Retry-After seconds."""

    status: int
    retry_after_s: int
    headers: dict[str, str]
    banned_until: float | None = None


@dataclass
class WeightLimiter:
    limit: int
    window_s: float = 60.0
    ban_after_429s: int = 5
    ban_s: float = 120.0
    window: int = 0
    used: int = 0
    throttled_in_window: int = 0
    ban_until: float = 0.0  # time.time()
    bans: int = 0

    def charge(self, weight: int, now: float | None = None) -> Verdict:
        """Count `weight` for one request and say whether it may be served."""
        now = time.time() if now is None else now
        verdict = self.count(weight, now)
        return self.judge(now) if verdict.status == 200 else verdict

    def count(self, weight: int, now: float) -> Verdict:
        """Count `weight` in the current window: 418 while banned (nothing counted), else 200 with the headers."""
        if now < self.ban_until:
            return Verdict(418, max(1, int(self.ban_until - now + 0.999)), {}, self.ban_until)
        window = int(now // self.window_s)
        if window != self.window:
            self.window, self.used, self.throttled_in_window = window, 0, 0
        self.used += weight
        return Verdict(200, 0, self.headers())

    def judge(self, now: float) -> Verdict:
        """After `count`: 200 within the limit, else 429 to the window's end, or 418 (a ban) for a client that
        kept calling after `ban_after_429s` 429s in this window."""
        headers = self.headers()
        if self.used <= self.limit:
            return Verdict(200, 0, headers)
        self.throttled_in_window += 1
        if self.throttled_in_window > self.ban_after_429s:
            ban_s = min(self.ban_s * 2 ** self.bans, 3 * 86_400.0)
            self.bans += 1
            self.ban_until = now + ban_s
            return Verdict(418, max(1, int(ban_s + 0.999)), headers, self.ban_until)
        return Verdict(429, max(1, int((self.window + 1) * self.window_s - now + 0.999)), headers)

    def headers(self) -> dict[str, str]:
        return {"X-MBX-USED-WEIGHT-1M": str(self.used), "X-MBX-USED-WEIGHT": str(self.used)}

    def current(self) -> int:
        return self.used if self.window == int(time.time() // self.window_s) else 0
