"""A bounded schemathesis run against the served /openapi.json of a real `miaotui serve` (the
`api_server` fixture): every operation, examples generated from the document with a fixed seed
(derandomized), checked for no 5xx, documented status codes, content types and response bodies
that match the documented schemas (errors in OpenAI's or Anthropic's shape).

Generation is kept cheap: token counts are capped before each call (the schema allows up to the
context, which would make a run take minutes), so what is exercised is validation and the error
paths, plus short generations."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CAPS = {"max_tokens": 2, "max_completion_tokens": 2, "n": 2, "best_of": 2}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def capped(body):
    """Bodies with their generation sizes capped (types left as generated: a wrong type must
    still be a 400)."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    for key, cap in CAPS.items():
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            out[key] = cap
    return out


def test_served_document_matches_behaviour(api_server):
    """Each operation in turn (schemathesis' pytest plugin does not run on this pytest)."""
    schema = schemathesis.openapi.from_url(api_server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: list[int] = []
    for operation in operations:
        _check(operation, statuses)
    # The run reached both the routes' work and their validation.
    assert statuses.count(200) >= 10 and statuses.count(400) >= 10, sorted(set(statuses))


def _check(operation, statuses: list[int]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=8,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        case.body = capped(case.body)
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        statuses.append(response.status_code)

    run()
