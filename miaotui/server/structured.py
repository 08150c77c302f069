"""A request's structured-output fields -> one StructuredOutput (or none), checked before any
token: `response_format` (OpenAI) or one of vLLM's `guided_json`, `guided_regex`,
`guided_grammar` (Lark), `guided_choice`. More than one is a 400, and so is a schema, regex or
grammar that llguidance cannot compile (the message names the problem)."""

from __future__ import annotations

import json
from typing import Any

from miaotui.engine.structured import grammar_for
from miaotui.errors import InvalidRequestError
from miaotui.sampling_params import StructuredOutput
from miaotui.server.errors import APIError

ANY_JSON_OBJECT = {"type": "object"}


def structured_output(req) -> StructuredOutput | None:
    """The one constraint `req` asks for, compiled once here to refuse bad ones early."""
    asked = _asked(req)
    if not asked:
        return None
    if len(asked) > 1:
        names = [param for param, _ in asked]
        raise APIError(400, f"give at most one structured-output field, got {names}", names[1])
    param, spec = asked[0]
    return checked(spec, param)


def checked(spec: StructuredOutput, param: str) -> StructuredOutput:
    try:
        grammar_for(spec)
    except InvalidRequestError as e:
        raise APIError(400, f"{param}: {e}", param) from e
    return spec


def schema_output(schema: Any, param: str) -> StructuredOutput:
    if not isinstance(schema, dict | bool):
        raise APIError(
            400, f"{param}: a JSON schema is an object, got {type(schema).__name__}", param
        )
    return StructuredOutput(json_schema=json.dumps(schema))


def _asked(req) -> list[tuple[str, StructuredOutput]]:
    asked = []
    fmt = req.response_format
    if fmt is not None and fmt.get("type") == "json_object":
        asked.append(("response_format", StructuredOutput(json_schema=json.dumps(ANY_JSON_OBJECT))))
    elif fmt is not None and fmt.get("type") == "json_schema":
        schema = fmt["json_schema"].get("schema", ANY_JSON_OBJECT)
        asked.append(("response_format", schema_output(schema, "response_format")))
    if req.guided_json is not None:
        schema = req.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise APIError(400, f"guided_json is not valid JSON: {e}", "guided_json") from e
        asked.append(("guided_json", schema_output(schema, "guided_json")))
    if req.guided_regex is not None:
        asked.append(("guided_regex", _spec("guided_regex", regex=req.guided_regex)))
    if req.guided_grammar is not None:
        asked.append(("guided_grammar", _spec("guided_grammar", grammar=req.guided_grammar)))
    if req.guided_choice is not None:
        asked.append(("guided_choice", _spec("guided_choice", choice=tuple(req.guided_choice))))
    return asked


def _spec(param: str, **field: Any) -> StructuredOutput:
    try:
        return StructuredOutput(**field)
    except InvalidRequestError as e:
        raise APIError(400, f"{param}: {e}", param) from e
