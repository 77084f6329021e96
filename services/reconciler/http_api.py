"""The managers' poll endpoint, served by the reconciler (aiohttp).

Contract: `GET /campaigns/{id}` requires `Authorization: Bearer <token>`, a
token of MAILER_API_TOKENS_FILE (services/pipeline/api_tokens.py). Without
one it answers 401 `missing_token`, with a header that is not `Bearer <token>`
401 `malformed_authorization`, with an unknown token 401 `invalid_token`, and
with no tokens configured 401 `no_api_tokens`, always with `WWW-Authenticate:
Bearer`. A `manager` token sees only campaigns whose `manager_id` is its actor
id: another manager's campaign answers the same 404 as an unknown one (its
existence is not revealed); `ops` and `admin` see all. Otherwise it answers
200 with `campaign_view` JSON (reason texts in Russian, or English when
Accept-Language prefers it), or 404 with `{"error": "campaign_not_found",
...}`. `GET /healthz` needs no token and answers 200 `{"status": "ok"}` while
Postgres answers and 503 otherwise. Every error body is JSON. Every refusal
is logged as the event `api.unauthorized` or `api.forbidden` (with the actor
id when known); a token is never logged. /metrics is served apart, on
MAILER_METRICS_PORT (services/pipeline/metrics.py).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from services.pipeline.api_tokens import ApiToken, ApiTokens, load_api_tokens
from services.pipeline.settings import Settings
from services.reconciler.campaign_view import CampaignViews, campaign_view
from services.reconciler.reason_texts import pick_language

_POOL = web.AppKey("pool", AsyncConnectionPool)
_SETTINGS = web.AppKey("settings", Settings)
_VIEWS = web.AppKey("views", CampaignViews)
_TOKENS = web.AppKey("tokens", ApiTokens)

log = logging.getLogger(__name__)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def _not_found(campaign_id: str) -> web.Response:
    return _json(
        {"error": "campaign_not_found", "message": f"no campaign with id {campaign_id!r}"},
        status=404,
    )


def _refuse(request: web.Request, reason: str, error: str, message: str) -> web.Response:
    """401 with a Bearer challenge; logs `api.unauthorized` (never the token)."""
    log.warning("API request refused: %s", reason, extra={
        "event": "api.unauthorized", "reason": reason, "path": request.path, "remote": request.remote,
    })
    challenge = 'Bearer realm="mailer"'
    if error == "invalid_token":
        challenge += ', error="invalid_token"'
    return _json({"error": error, "message": message}, status=401,
                 headers={"WWW-Authenticate": challenge})


def authenticate(request: web.Request) -> ApiToken | web.Response:
    """The token entry of the request's bearer token, or the 401 response to send."""
    tokens = request.app[_TOKENS]
    if not tokens.configured:
        return _refuse(request, "no_tokens_configured", "no_api_tokens",
                       "no API tokens are configured (MAILER_API_TOKENS_FILE): "
                       "every API request is refused")
    header = request.headers.get("Authorization")
    if header is None:
        return _refuse(request, "missing_token", "missing_token",
                       "send the header Authorization: Bearer <token>")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return _refuse(request, "malformed_authorization", "malformed_authorization",
                       "the Authorization header must be: Bearer <token>")
    entry = tokens.lookup(token)
    if entry is None:
        return _refuse(request, "unknown_token", "invalid_token", "unknown API token")
    return entry


async def get_campaign(request: web.Request) -> web.Response:
    """`GET /campaigns/{id}`: the campaign's view, for a token allowed to see it."""
    who = authenticate(request)
    if isinstance(who, web.Response):
        return who
    campaign_id = request.match_info["campaign_id"]
    settings = request.app[_SETTINGS]
    async with request.app[_POOL].connection() as conn:
        if not who.sees_all:
            cur = await conn.execute(
                "SELECT manager_id FROM campaigns WHERE campaign_id = %s", (campaign_id,)
            )
            row = await cur.fetchone()
            if row is None:
                return _not_found(campaign_id)
            if not who.may_see(row[0]):
                log.warning("API request refused: campaign of another manager", extra={
                    "event": "api.forbidden", "actor_id": who.actor_id, "role": who.role,
                    "campaign_id": campaign_id, "path": request.path, "remote": request.remote,
                })
                return _not_found(campaign_id)  # the same answer as an unknown campaign
        view = await campaign_view(
            conn, campaign_id, settings.failed_recipients_limit, request.app[_VIEWS],
            pick_language(request.headers.get("Accept-Language")),
        )
    if view is None:
        return _not_found(campaign_id)
    return _json(view)


async def healthz(request: web.Request) -> web.Response:
    """`GET /healthz`: 200 while Postgres answers."""
    try:
        async with request.app[_POOL].connection(timeout=2) as conn:
            await conn.execute("SELECT 1")
    except Exception as exc:
        return _json({"status": "unhealthy", "error": type(exc).__name__}, status=503)
    return _json({"status": "ok"})


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn aiohttp's HTML error pages into JSON bodies."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        return _json({"error": exc.reason.lower().replace(" ", "_"), "message": exc.text},
                     status=exc.status)


def build_web_app(
    pool: AsyncConnectionPool, settings: Settings, views: CampaignViews,
    tokens: ApiTokens | None = None,
) -> web.Application:
    """The aiohttp application of the poll endpoint; `tokens` default to MAILER_API_TOKENS_FILE's."""
    app = web.Application(middlewares=[json_errors])
    app[_POOL] = pool
    app[_SETTINGS] = settings
    app[_VIEWS] = views
    app[_TOKENS] = load_api_tokens(settings) if tokens is None else tokens
    app.router.add_get("/campaigns/{campaign_id}", get_campaign)
    app.router.add_get("/healthz", healthz)
    return app


async def start_server(
    pool: AsyncConnectionPool, settings: Settings, views: CampaignViews,
    tokens: ApiTokens | None = None,
) -> web.AppRunner:
    """Start serving on the configured host and port; return the runner to clean up."""
    runner = web.AppRunner(build_web_app(pool, settings, views, tokens), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.http_host, settings.http_port).start()
    return runner
