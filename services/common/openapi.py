"""OpenAPI documents that describe what the routes really take and answer.

The gateway's and the stages' routes read raw `Request`s (size-checked streaming, JSON or
protobuf), so FastAPI cannot see their bodies. `build_openapi` fills each declared operation in
from the pydantic wire models: its request body, its 200 answer, the error answers it can give
(401, 408, 413, 422 and 503 with Retry-After on every operation, plus each operation's own), its
path parameters, and the `X-API-Key` security scheme. /docs and /openapi.json stay open: they
describe the API, they do not call it. A schema-driven fuzzer (tests/test_api_fuzz.py) then
tests the real thing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from services.common import wire

SCHEME = "ApiKey"
PATH_PARAMETER = re.compile(r"{(\w+)}")
ID_PARAMETER: dict[str, Any] = {"type": "integer", "minimum": 0}
ERROR = {
    "type": "object", "required": ["detail"],
    "properties": {"detail": {"description": "what is wrong (a string, or a list of problems)"},
                   "field": {"type": "string", "description": "the offending field"}},
}
ERRORS = {
    "401": "missing or wrong X-API-Key",
    "408": "the request body did not arrive within the read timeout",
    "413": "body too large",
    "422": "malformed body, or a value the API refuses (the field is named)",
}


@dataclass(frozen=True)
class Operation:
    """One documented operation. `answers`: its own error statuses -> description;
    `path_schema`: a path parameter's JSON schema (default: a non-negative integer id)."""

    request: type[BaseModel] | None
    response: type[BaseModel] | None
    summary: str
    answers: Mapping[str, str] = field(default_factory=dict)
    path_schema: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    body_required: bool = True


Operations = Mapping[tuple[str, str], Operation]


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build_openapi(app: FastAPI, operations: Operations, description: str,
                  key_description: str) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description=description)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR
    components["securitySchemes"] = {
        SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key",
                 "description": key_description}}
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for (path, method), op in operations.items():
        operation = doc.setdefault("paths", {}).setdefault(path, {}).setdefault(method, {})
        operation["summary"] = op.summary
        operation["security"] = [{SCHEME: []}]
        names = PATH_PARAMETER.findall(path)
        if names:
            operation["parameters"] = [
                {"name": name, "in": "path", "required": True,
                 "schema": dict(op.path_schema.get(name, ID_PARAMETER))} for name in names]
        if op.request is not None:
            operation["requestBody"] = {"required": op.body_required, "content": {
                "application/json": {"schema": _schema(op.request, schemas)},
                wire.PROTOBUF: {"schema": {"type": "string", "format": "binary"}}}}
        body = _schema(op.response, schemas) if op.response is not None else {"type": "object"}
        answers: dict[str, Any] = {"200": {"description": "OK",
                                           "content": {"application/json": {"schema": body}}}}
        for code, text in {**ERRORS, **op.answers}.items():
            answers[code] = {"description": text, "content": error_ref}
        answers["503"] = {
            "description": op.answers.get("503", "overloaded, or a dependency unreachable: "
                                                 "retry later"),
            "headers": {"Retry-After": {"schema": {"type": "integer"},
                                        "description": "seconds to wait"}},
            "content": error_ref}
        operation["responses"] = answers
    return doc


def install_openapi(app: FastAPI, operations: Callable[[], Operations], description: str,
                    key_description: str) -> None:
    """Serve `build_openapi` at /openapi.json (built once, on first request)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, operations(), description, key_description)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
