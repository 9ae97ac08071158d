"""The OpenAPI 3.1 document of the HTTP API, generated from the route table itself.

One source of truth: paths, methods, required roles and the body, query and answer schemas
come from the same Route entries and msgspec types that dispatch authenticates and validates
with (bounds included); success statuses, examples and links come from dtfd/server/contract.py,
whose examples a test decodes with those types. So the document cannot drift from the server.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from dtfd.server.contract import OPERATIONS, Operation
from dtfd.state.machine import Result

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}
REF = "#/components/schemas/{name}"
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer", "minimum": 1}}}
NOT_SERVING = frozenset({"/health", "/ready", "/leader"})  # 503 means "not healthy / not ready / not the leader"
REFUSALS = {
    "401": ("no token, or one this cluster does not know", {}),
    "403": ("the token's role may not call this route", {}),
    "429": ("slow down: too many failed authentications from this address or with this token prefix, "
            "or (submissions) over the client's rate or the queue limit", RETRY_AFTER),
}
BAD_BODY = {
    "400": ("the body is not JSON", {}),
    "413": ("the body is larger than api.max_body_bytes", {}),
    "422": ("a field is missing, unknown, of the wrong type or out of its bounds; the message names it", {}),
}


def document(routes: Sequence, version: str) -> dict:
    kinds = {kind for route in routes for kind in (route.body, route.answer) if kind is not None}
    _, schemas = msgspec.json.schema_components(sorted(kinds | {Result}, key=lambda kind: kind.__name__), ref_template=REF)
    schemas["Error"] = ERROR
    operation_ids = {(route.method, route.name): _operation_id(route) for route in routes}
    paths: dict[str, dict] = {}
    for route in routes:
        contract = OPERATIONS.get((route.method, route.name))
        doc = (route.handler.__doc__ or "").strip().splitlines()
        operation: dict = {
            "operationId": operation_ids[(route.method, route.name)],
            "summary": doc[0] if doc else route.name,
            "parameters": _parameters(route, contract),
            "responses": _responses(route, contract, operation_ids),
        }
        if route.roles is not None:
            operation["security"] = [{"bearer": []}]
            operation["description"] = "Roles: " + ", ".join(sorted(route.roles))
        if route.body is not None:
            body: dict = {"schema": {"$ref": REF.format(name=route.body.__name__)}}
            if contract is not None and contract.request is not None:
                body["example"] = contract.request
            operation["requestBody"] = {"required": True, "content": {"application/json": body}}
        paths.setdefault(route.name, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "dtf coordinator API", "version": version},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _operation_id(route) -> str:
    return f"{route.method.lower()}_{route.handler.__name__}"


def _parameters(route, contract: Operation | None) -> list[dict]:
    examples = contract.params if contract is not None else {}
    parameters = []
    for name in re.findall(r"\{(\w+)\}", route.name):
        parameter = {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        if name in examples:
            parameter["example"] = examples[name]
        parameters.append(parameter)
    if route.query is not None:
        query = msgspec.json.schema(route.query)["$defs"][route.query.__name__]
        for name, schema in query["properties"].items():
            parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
    return parameters


def _responses(route, contract: Operation | None, operation_ids: dict) -> dict:
    contract = contract or Operation(None)
    success: dict = {"description": "done", "content": _content(route, contract.example)}
    links = {
        name: {"operationId": operation_ids[link.to], "parameters": link.parameters}
        for name, link in contract.links.items()
        if link.to in operation_ids
    }
    if links:
        success["links"] = links
    responses = {str(contract.status): success}
    if route.answer is Result and route.method != "GET":
        responses["409"] = {
            "description": "applied, but refused by the state machine (e.g. compare-and-set failed): the write's result",
            "content": {"application/json": {"schema": {"$ref": REF.format(name="Result")}}},
        }
    if route.name in NOT_SERVING:
        responses["503"] = {"description": "not healthy, not ready or not the leader", "content": _error(), "headers": RETRY_AFTER}
    refusals = (REFUSALS if route.roles is not None else {}) | (BAD_BODY if route.body is not None else {})
    for status, (description, headers) in refusals.items():
        responses[status] = {"description": description, "content": _error()} | ({"headers": headers} if headers else {})
    responses["default"] = {"description": "an error, named (503 with Retry-After when no leader is known)", "content": _error()}
    return responses


def _content(route, example: object) -> dict:
    if route.name == "/metrics":
        return {"text/plain": {"schema": {"type": "string"}, "example": example}}
    schema = {"$ref": REF.format(name=route.answer.__name__)} if route.answer is not None else {"type": "object"}
    return {"application/json": {"schema": schema} | ({"example": example} if example is not None else {})}


def _error() -> dict:
    return {"application/json": {"schema": {"$ref": REF.format(name="Error")}}}
