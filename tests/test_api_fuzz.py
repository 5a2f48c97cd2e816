"""Schema-driven fuzzing (schemathesis) of every service's OpenAPI, over real HTTP.

The gateway (`cascade serve all`, tiny marketplace) and the three stage services run as real
processes with their keys on. For every operation each service publishes, schemathesis
generates bodies, paths and headers from the schema (valid and invalid ones) and checks what
comes back: never a server error, a status code and a content type the schema declares, a body
that matches the declared response schema, and invalid input refused with a 4xx. The number of
examples is bounded and the generation derandomised, so the suite stays short and a failure
reproduces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks

from tests.test_e2e_gateway import ADMIN, API, INTERNAL, _env, _start, _stop, _wait_ready

pytestmark = pytest.mark.slow
CHECKS = [not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection]
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def services(tiny_bundle: Path, tiny_data: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """name -> base URL of the embedded gateway and each stage service."""
    exports = tmp_path_factory.mktemp("exports")
    procs = {"gateway": _start("all", tiny_bundle, _env(CASCADE_EXPORT_DIR=str(exports)),
                               "--data", str(tiny_data))}
    procs.update({name: _start(name, tiny_bundle, _env())
                  for name in ("retrieval", "prerank", "rank")})
    try:
        _wait_ready(list(procs.values()))
        yield {name: url for name, (_, url) in procs.items()}
    finally:
        _stop(list(procs.values()))


def _key(service: str, path: str) -> str:
    """The key each caller really holds: admin for /admin on the gateway, the frontend key for
    the rest of the gateway, the internal key for the stages."""
    if service != "gateway":
        return INTERNAL
    return ADMIN if path.startswith("/admin") else API


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=lambda m: m.value)
@pytest.mark.parametrize("service", ["gateway", "retrieval", "prerank", "rank"])
def test_every_operation_answers_as_its_schema_says(services: dict[str, str], service: str,
                                                     mode: GenerationMode) -> None:
    """Valid and invalid input for every operation of `service` (schemathesis's own pytest
    plugin does not run under pytest 9, so the operations are walked here)."""
    schema = schemathesis.openapi.from_url(services[service] + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, f"{service} publishes no operations"
    fuzzed = 0
    for operation in operations:
        try:
            _fuzz(operation, mode, {"X-API-Key": _key(service, operation.path)})
            fuzzed += 1
        except Unsatisfiable:
            # only in negative mode: an operation with no parameters and no body (GET
            # /healthz) has no invalid input to send
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert fuzzed, f"no operation of {service} could be fuzzed"


def _fuzz(operation: schemathesis.APIOperation, mode: GenerationMode,
          headers: dict[str, str]) -> None:
    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

    call()
