"""The OpenAPI 3.1 document of the HTTP API, generated from the route table itself.

One source of truth: paths, methods, required roles and request body schemas come
from the same Route entries and msgspec types that dispatch authenticates and validates
with, so the document cannot drift from what the server accepts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}


SUCCESS = {("POST", "/v1/tasks"): "201", ("POST", "/v1/leadership/transfer"): "202"}
NOT_SERVING = frozenset({"/health", "/ready", "/leader"})  # 503 means "not healthy / not ready / not the leader"
WRITES_WITH_RESULT = frozenset({"/v1/kv/{key}", "/v1/kv/{key}/cas", "/v1/kv", "/v1/config/{key}"})


def document(routes: Sequence, version: str) -> dict:
    from dtfd.state.machine import Result

    bodies = sorted({route.body for route in routes if route.body is not None}, key=lambda kind: kind.__name__)
    _, schemas = msgspec.json.schema_components([*bodies, Result], ref_template="#/components/schemas/{name}")
    schemas["Error"] = ERROR
    paths: dict[str, dict] = {}
    for route in routes:
        doc = (route.handler.__doc__ or "").strip().splitlines()
        operation: dict = {
            "operationId": f"{route.method.lower()}_{route.handler.__name__}",
            "summary": doc[0] if doc else route.name,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"\{(\w+)\}", route.name)
            ],
            "responses": {
                SUCCESS.get((route.method, route.name), "200"): {"description": "done", "content": _content(route.name)},
                "default": {"description": "an error, named", "content": _error()},
            },
        }
        if route.name in NOT_SERVING:
            operation["responses"]["503"] = {"description": "not healthy, not ready or not the leader", "content": _error()}
        if route.name in WRITES_WITH_RESULT and route.method != "GET":
            operation["responses"]["409"] = {
                "description": "applied, but refused by the state machine (e.g. compare-and-set failed): the write's result",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Result"}}},
            }
        if route.roles is not None:
            operation["security"] = [{"bearer": []}]
            operation["description"] = "Roles: " + ", ".join(sorted(route.roles))
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}},
            }
        paths.setdefault(route.name, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "dtf coordinator API", "version": version},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _error() -> dict:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def _content(path: str) -> dict:
    if path == "/metrics":
        return {"text/plain": {"schema": {"type": "string"}}}
    return {"application/json": {"schema": {"type": "object"}}}
