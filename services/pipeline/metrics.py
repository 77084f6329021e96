"""The Prometheus series of the services, and the `/metrics` endpoint each one serves (R23).

Contract: the series below are module-level prometheus-client objects with
bounded label sets (outcome kinds, error classes, defer reasons, services —
never a recipient, never a campaign). `serve_metrics(settings)` starts the
`/metrics` HTTP endpoint of this process on MAILER_METRICS_PORT (0: none).
The limiter (`mailer_limiter_decisions_total`, `mailer_redis_errors_total`)
and the quota sync (`mailer_quota_remaining`, `mailer_quota_sync_errors_total`)
define theirs beside their code; they are served here all the same.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.pipeline.settings import Settings

log = logging.getLogger(__name__)

SENDS = Counter(
    "mailer_sends_total", "Send commands handled by the senders, by outcome and error class.",
    ["outcome", "error_class"],
)
DEFERRALS = Counter(
    "mailer_deferrals_total", "Sends deferred, by reason (closed set).", ["reason"],
)
SMTP_SECONDS = Histogram(
    "mailer_smtp_duration_seconds", "Time of one send's SMTP conversation, by outcome.", ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
DEAD_LETTERS = Counter(
    "mailer_dead_letters_total", "Messages sent to the dead-letter topic, by service and error type.",
    ["service", "error_type"],
)
CAMPAIGNS = Gauge(
    "mailer_campaigns", "Campaigns by state (sending, deferred, paused, completed, cancelled).",
    ["state"],
)
RECIPIENTS_PENDING = Gauge(
    "mailer_recipients_pending", "Recipients of sending campaigns not yet in a terminal state.",
)
BREAKERS_OPEN = Gauge(
    "mailer_circuit_breakers_open", "Circuit breakers open now, by scope (campaign, account).",
    ["scope"],
)
STALLED_SECONDS = Gauge(
    "mailer_campaign_stalled_seconds",
    "Longest time any sending campaign with recipients waiting and no deferral ahead"
    " has made no progress (0: none). The 30-minute alert watches it.",
)
CAMPAIGN_SECONDS = Histogram(
    "mailer_campaign_duration_seconds", "From start to completion of a campaign.",
    buckets=(10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400),
)


def zero_known_series(service: str) -> None:
    """Export the label sets every process may count at 0 from the start, so that the first
    increment after a (re)start shows in `rate()` and `increase()` (alerts and panels)."""
    from services.pipeline.defer_reasons import DeferReason

    for outcome, error_class in (("sent", "none"), ("failed", "permanent"), ("unknown", "none")):
        SENDS.labels(outcome, error_class)
    for outcome in ("sent", "failed"):
        SMTP_SECONDS.labels(outcome)
    for reason in DeferReason:
        DEFERRALS.labels(reason.value)
    for error_type in ("invalid_message", "invalid_campaign", "unknown_campaign", "internal_error"):
        DEAD_LETTERS.labels(service, error_type)


def serve_metrics(settings: Settings, service: str) -> None:
    """Serve this process's `/metrics` on MAILER_METRICS_PORT, when it is set."""
    zero_known_series(service)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
        log.info("metrics on %s:%d/metrics", settings.metrics_host, settings.metrics_port,
                 extra={"event": "metrics.serving"})
