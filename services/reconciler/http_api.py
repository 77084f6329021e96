"""The managers' poll endpoint, served by the reconciler (aiohttp).

Contract: `GET /campaigns/{id}` answers 200 with `campaign_view` JSON (reason
texts in Russian, or English when Accept-Language prefers it), or 404
with `{"error": "campaign_not_found", ...}`; `GET /healthz` answers 200 while
Postgres answers and 503 otherwise. Every error body is JSON.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from services.pipeline.settings import Settings
from services.reconciler.campaign_view import CampaignViews, campaign_view
from services.reconciler.reason_texts import pick_language

_POOL = web.AppKey("pool", AsyncConnectionPool)
_SETTINGS = web.AppKey("settings", Settings)
_VIEWS = web.AppKey("views", CampaignViews)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def get_campaign(request: web.Request) -> web.Response:
    """`GET /campaigns/{id}`."""
    campaign_id = request.match_info["campaign_id"]
    settings = request.app[_SETTINGS]
    async with request.app[_POOL].connection() as conn:
        view = await campaign_view(
            conn, campaign_id, settings.failed_recipients_limit, request.app[_VIEWS],
            pick_language(request.headers.get("Accept-Language")),
        )
    if view is None:
        return _json(
            {"error": "campaign_not_found", "message": f"no campaign with id {campaign_id!r}"},
            status=404,
        )
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
    pool: AsyncConnectionPool, settings: Settings, views: CampaignViews
) -> web.Application:
    """The aiohttp application of the poll endpoint."""
    app = web.Application(middlewares=[json_errors])
    app[_POOL] = pool
    app[_SETTINGS] = settings
    app[_VIEWS] = views
    app.router.add_get("/campaigns/{campaign_id}", get_campaign)
    app.router.add_get("/healthz", healthz)
    return app


async def start_server(
    pool: AsyncConnectionPool, settings: Settings, views: CampaignViews
) -> web.AppRunner:
    """Start serving on the configured host and port; return the runner to clean up."""
    runner = web.AppRunner(build_web_app(pool, settings, views), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.http_host, settings.http_port).start()
    return runner
