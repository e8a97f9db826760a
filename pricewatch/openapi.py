"""OpenAPI 3.1 description of every HTTP route (being written)."""

from __future__ import annotations

from aiohttp import web

from .api import json_response


def build_spec(app: web.Application) -> dict:
    return {"openapi": "3.1.0", "info": {"title": "pricewatch", "version": "0.1.0"},
            "paths": {}}


async def spec_handler(request: web.Request) -> web.Response:
    return json_response(build_spec(request.app))


async def docs_handler(request: web.Request) -> web.Response:
    return web.Response(text="<!doctype html><title>pricewatch API</title>",
                        content_type="text/html")
