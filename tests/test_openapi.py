"""The OpenAPI document: it matches the router, is valid OpenAPI 3.1, renders as HTML, and
a live server answers as it says under schemathesis' generated requests."""

from __future__ import annotations

import asyncio
import html
import ipaddress
from collections import defaultdict

import hypothesis
import requests
import schemathesis
from aiohttp import web
from conftest import LiveServer, bearer, register
from fake_alphavantage import FakeAlphaVantage
from hypothesis import HealthCheck, Phase
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis import GenerationMode
from smtp_sink import SmtpSink

from pricewatch.auth import AUTH
from pricewatch.delivery.base import Failed
from pricewatch.delivery.webhook import WebhookSink
from pricewatch.market import MARKET
from pricewatch.openapi import OPERATIONS, build_spec
from pricewatch.server import STORE, create_app

EXAMPLES_PER_OPERATION = 25


def routed_operations(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path) of every route, trailing slashes folded, HEAD ignored."""
    return {
        (route.method, route.resource.canonical.rstrip("/") or "/")
        for route in app.router.routes()
        if route.method != "HEAD"
    }


def documented_operations(spec: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}


def test_every_route_is_documented_and_every_documented_operation_is_routed(make_settings):
    app = create_app(make_settings())
    routed, documented = routed_operations(app), documented_operations(build_spec(app))
    assert routed - documented == set(), "routes missing from pricewatch/openapi.py OPERATIONS"
    assert documented - routed == set(), "documented operations that no route serves"
    assert documented == set(OPERATIONS)


def test_document_is_valid_openapi_3_1(make_settings):
    spec = build_spec(create_app(make_settings()))
    OpenAPIV31SpecValidator(spec).validate()
    assert spec["openapi"].startswith("3.1.")
    assert all(not path.endswith("/") or path == "/" for path in spec["paths"])


def test_authenticated_operations_declare_bearer_auth_and_401(make_settings):
    spec = build_spec(create_app(make_settings()))
    for path, ops in spec["paths"].items():
        for method, operation in ops.items():
            if operation["security"]:
                assert {"bearerAuth": []} in operation["security"], (method, path)
                assert "401" in operation["responses"], (method, path)


async def test_openapi_json_is_served_with_and_without_trailing_slash(server, http):
    for path in ("/openapi.json", "/openapi.json/"):
        async with http.get(server.url + path) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            assert await resp.json() == build_spec(server.app)


async def test_docs_page_is_self_contained_html_naming_every_operation(server, http):
    async with http.get(server.url + "/docs") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    for method, path in OPERATIONS:
        assert html.escape(path) in page, path
        assert f'<span class="m {method}">' in page
    assert "<script" not in page and "https://" not in page  # works offline, no CDN
    assert 'id="schema-Alert"' in page and "&quot;exclusiveMinimum&quot;: 0" in page


async def test_websocket_routes_answer_a_plain_get_as_documented(server, http):
    user = await register(http, server)
    spec = build_spec(server.app)
    cases = [
        ("/ws/ohlc", {}, 400, "invalid_request"),
        ("/ws/rates/", {}, 400, "invalid_request"),
        ("/live-feed/subscribe", {}, 401, "not_authenticated"),
        ("/live-feed/subscribe/", bearer(user["access"]), 400, "invalid_request"),
    ]
    for path, headers, status, code in cases:
        async with http.get(server.url + path, headers=headers) as resp:
            assert (resp.status, (await resp.json())["error"]) == (status, code), path
        responses = spec["paths"][path.rstrip("/")]["get"]["responses"]
        assert {"101", str(status)} <= set(responses)


# -- schemathesis against a live server ------------------------------------------------------

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]

# Admin operations run with an admin's token, except the feed admin's POSTs: those would
# make the server resolve and connect to whatever ws:// host the fuzzer invents, and this
# test may only talk to loopback, so they run as a plain user (403).
AS_ADMIN = {"GET /api/v1/feeds", "DELETE /api/v1/feeds", "DELETE /api/v1/feeds/{feed_id}"}


def fuzz(
    schema_url: str, base_url: str, user_token: str, admin_token: str
) -> tuple[list[str], dict[str, set[int]]]:
    """Run every operation of the served document against the server.

    Returns (failures, statuses each operation got from valid requests). Blocking
    (requests + hypothesis): the test runs it in a thread, since the server runs on the
    test's event loop. Websocket operations are included: requests cannot upgrade, so they
    check the documented answers to a plain GET (400, or 401 without a token).
    """
    schema = schemathesis.openapi.from_url(schema_url)
    schema.config.update(base_url=base_url)
    failures: list[str] = []
    statuses: dict[str, set[int]] = defaultdict(set)
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            token = admin_token if operation.label in AS_ADMIN else user_token
            headers = {"Authorization": f"Bearer {token}"}
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
                @hypothesis.settings(
                    max_examples=EXAMPLES_PER_OPERATION,
                    deadline=None,
                    phases=[Phase.explicit, Phase.generate],
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                def check(case: schemathesis.Case) -> None:
                    response = case.call(session=session, headers=headers, timeout=10)
                    if mode is GenerationMode.POSITIVE:
                        statuses[operation.label].add(response.status_code)
                    case.validate_response(response, checks=CHECKS)

                try:
                    check()
                except hypothesis.errors.Unsatisfiable:
                    # No parameters and no body: nothing to make invalid in negative mode.
                    assert mode is GenerationMode.NEGATIVE, operation.label
                # FailureGroup (several failures of one case) is a BaseExceptionGroup.
                except (Exception, schemathesis.errors.FailureGroup) as exc:
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
    return failures, statuses


async def test_live_server_conforms_to_its_openapi_document(make_settings, http, monkeypatch):
    # Demo feed: prices exist. Fake AlphaVantage on loopback: POST /api/v1/quotes can 201.
    # The login limiter is lifted so the fuzzer's failed logins stay 401, not 429. SMTP on
    # loopback: without it, the verification-code resend is a 503 (server error) by design.
    # The fuzzer invents webhook URLs: no host name is looked up (a channel for one is a 400),
    # and nothing is ever sent to one (alerts do trigger on the demo feed).
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def literal_only(host, *args, **kwargs):
        try:
            ipaddress.ip_address(str(host).strip("[]"))
        except ValueError:
            raise OSError(f"no DNS in this test ({host!r})") from None
        return await resolve(host, *args, **kwargs)

    async def never_sent(self, batch):
        return Failed("nothing leaves the machine in this test")

    monkeypatch.setattr(loop, "getaddrinfo", literal_only)
    monkeypatch.setattr(WebhookSink, "send", never_sent)
    async with (
        FakeAlphaVantage() as fake,
        SmtpSink() as smtp,
        LiveServer(
            make_settings(
                feed="demo",
                login_max_failures=10**6,
                max_alerts_per_user=10**6,
                alphavantage_api_key="KEY",
                alphavantage_url=fake.url,
                smtp_host="127.0.0.1",
                smtp_port=smtp.port,
            )
        ) as server,
    ):
        priced = asyncio.Event()
        server.app[MARKET].trade_hooks.append(lambda tick: priced.set())
        await asyncio.wait_for(priced.wait(), 10)
        user = await register(http, server, "fuzzer")
        admin = await server.app[STORE].create_user("root", "root@example.com", "-", is_admin=True)
        admin_tokens = await server.app[AUTH].issue_pair(admin.id)
        async with http.post(
            server.url + "/api/v1/alerts",
            json={"asset": "BTCUSDT", "price": 1.0},
            headers=bearer(user["access"]),
        ) as resp:
            assert resp.status == 201  # alert 1 exists: generated ids sometimes hit it
        failures, statuses = await asyncio.to_thread(
            fuzz, server.url + "/openapi.json", server.url, user["access"], admin_tokens["access"]
        )
    assert not failures, "\n\n".join(failures)
    # The tokens worked: valid requests to authenticated operations got past the 401.
    for (method, path), entry in OPERATIONS.items():
        if entry["auth"] is not None:
            assert statuses[f"{method} {path}"] - {401}, (method, path)
