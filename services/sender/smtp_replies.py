"""What an SMTP reply asks of us: slow down, retry later, and after how long.

Contract: `is_slow_down(code, reply)` is True for the replies providers use
to throttle a sender (421 and 451, enhanced codes 4.7.x and 4.4.5, and texts
such as "too many", "slow down", "rate limit", "try again later").
`retry_after(reply)` is the delay in seconds a reply names ("try again in 30
seconds", "retry after 5 minutes"), or None. Issue 4 grows this into the full
classification table; these two answers are what the limits need.
"""

from __future__ import annotations

import re

_SLOW_CODES = frozenset({421, 451})
#: An enhanced status code (RFC 3463) opens the reply text, after the reply code if repeated.
_SLOW_ENHANCED = re.compile(r"^\s*(?:\d{3}[ -])?4\.(7\.\d{1,3}|4\.5)\b")
_SLOW_TEXT = re.compile(
    r"too many|slow down|rate.?limit|throttl|try again later|temporarily deferred|too fast",
    re.IGNORECASE,
)
_RETRY_AFTER = re.compile(
    r"(?:try again|retry)(?: later)?\s+(?:in|after)\s+(\d{1,6})\s*(s|sec|second|m|min|minute|h|hour)s?\b",
    re.IGNORECASE,
)
_UNIT = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def is_slow_down(code: int | None, reply: str) -> bool:
    """Whether a 4xx reply asks the sender to send more slowly."""
    if code is None or not 400 <= code <= 499:
        return False
    return code in _SLOW_CODES or bool(_SLOW_ENHANCED.search(reply) or _SLOW_TEXT.search(reply))


def retry_after(reply: str) -> float | None:
    """Seconds the reply asks us to wait ("try again in 30 seconds"), or None."""
    match = _RETRY_AFTER.search(reply)
    if match is None:
        return None
    return float(int(match.group(1)) * _UNIT[match.group(2).lower()])
