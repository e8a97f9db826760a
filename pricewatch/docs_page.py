"""`GET /docs`: the API document (openapi.py) rendered as one plain HTML page that works
offline (no script, no CDN)."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from aiohttp import web

from .openapi import JSON, build_spec

CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;
color:#1d232a}h1{margin-bottom:0}section{border-top:1px solid #d8dee4;padding:.6rem 0}
h2{font-size:1.05rem;margin:.4rem 0}.m{display:inline-block;min-width:4.2rem;font:700 .8rem
monospace;padding:.15rem .4rem;border-radius:4px;color:#fff;background:#57606a;text-align:center}
.GET{background:#0969da}.POST{background:#1a7f37}.PUT,.PATCH{background:#9a6700}.DELETE{
background:#cf222e}pre{background:#f6f8fa;padding:.5rem;overflow:auto;font-size:.8rem;
margin:.2rem 0}
table{border-collapse:collapse}td,th{border:1px solid #d8dee4;padding:.2rem .5rem;text-align:left;
vertical-align:top}.auth{color:#8250df}nav a{margin-right:.6rem}"""


def _pretty(schema: Any, spec: dict | None = None) -> str:
    """Schema as indented JSON, HTML-escaped, with `$ref`s linking to their definition.

    With `spec`, a schema that is just a `$ref` is shown expanded under its name.
    """
    name = schema.get("$ref", "").rsplit("/", 1)[-1] if isinstance(schema, dict) else ""
    if spec is not None and name:
        return f'<a href="#schema-{name}">{name}</a> ' + _pretty(
            spec["components"]["schemas"][name]
        )
    text = html.escape(json.dumps(schema, indent=2, ensure_ascii=False))
    return re.sub(
        r"&quot;#/components/schemas/(\w+)&quot;",
        r'<a href="#schema-\1">&quot;#/components/schemas/\1&quot;</a>',
        text,
    )


def _render_operation(method: str, path: str, operation: dict, spec: dict) -> str:
    security = operation["security"]
    auth = (
        "public"
        if not security
        else " or ".join(next(iter(s)) for s in security)
        .replace("bearerAuth", "Authorization: Bearer &lt;access token&gt;")
        .replace("tokenQuery", "?token=&lt;access token&gt;")
    )
    out = [
        f'<section id="{operation["operationId"]}"><h2><span class="m {method}">{method}'
        f"</span> <code>{html.escape(path)}</code> — {html.escape(operation['summary'])}"
        f'</h2><p class="auth">Auth: {auth}</p>'
    ]
    if "description" in operation:
        out.append(f'<p style="white-space:pre-wrap">{html.escape(operation["description"])}</p>')
    if operation.get("parameters"):
        rows = "".join(
            f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}</td>"
            f"<td>{'yes' if p['required'] else 'no'}</td><td><pre>{_pretty(p['schema'])}</pre>"
            f"</td><td>{html.escape(p.get('description', ''))}</td></tr>"
            for p in operation["parameters"]
        )
        out.append(
            "<h3>Parameters</h3><table><tr><th>name</th><th>in</th><th>required</th>"
            f"<th>schema</th><th></th></tr>{rows}</table>"
        )
    if "requestBody" in operation:
        body = operation["requestBody"]
        out.append(
            f"<h3>Request body ({JSON}, {'required' if body['required'] else 'optional'}"
            f")</h3><pre>{_pretty(body['content'][JSON]['schema'], spec)}</pre>"
        )
    out.append("<h3>Responses</h3><table>")
    for status, response in operation["responses"].items():
        if "$ref" in response:
            response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        cell = "".join(
            f"<div>{html.escape(media)}</div><pre>{_pretty(c['schema'], spec)}</pre>"
            for media, c in response.get("content", {}).items()
        )
        out.append(
            f"<tr><td><b>{status}</b></td><td>{html.escape(response['description'])}"
            f"</td><td>{cell}</td></tr>"
        )
    out.append("</table></section>")
    return "".join(out)


def render_html(spec: dict) -> str:
    """The whole document as one self-contained HTML page (no scripts, no CDN)."""
    info = spec["info"]
    nav = " ".join(
        f'<a href="#{op["operationId"]}">{method.upper()} {html.escape(path)}</a>'
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    )
    parts = [
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{info['title']} API"
        f"</title><style>{CSS}</style><h1>{info['title']} API {info['version']}</h1>"
        f"<p>{html.escape(info['description'])} Machine-readable: "
        f'<a href="/openapi.json">/openapi.json</a>.</p><nav>{nav}</nav>'
    ]
    for path, ops in spec["paths"].items():
        for method, operation in ops.items():
            parts.append(_render_operation(method.upper(), path, operation, spec))
    parts.append("<h2>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        parts.append(
            f'<section id="schema-{name}"><h3>{name}</h3><pre>{_pretty(schema)}</pre></section>'
        )
    return "".join(parts) + "</html>"


async def docs_handler(request: web.Request) -> web.Response:
    return web.Response(text=render_html(build_spec(request.app)), content_type="text/html")
