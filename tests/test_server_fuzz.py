"""Schemathesis fuzzing of the server's OpenAPI schema against the running server: no 5xx.

Bounded: a fixed number of generated requests per operation and mode, derandomised. Every
operation is fuzzed with schema-valid data (and invalid data too for the /v1 routes), with
generated path parameters (mostly unknown sessions) and again, except DELETE, against one real
session, so that the prompt routes reach the model. The status counts are printed (``-s``).
"""

from __future__ import annotations

from collections import Counter

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from fastsam3d.server.wire import raw_volume_request

pytest_plugins = ["server_utils"]  # the shared `checkpoint` and `server` fixtures
pytestmark = pytest.mark.slow

EXAMPLES = 10  # per operation and mode, on generated path parameters
EXAMPLES_LIVE = 3  # per operation and mode, on the real session (clicks run the model)


def fuzz(strategy, server: str, examples: int, counts: Counter, failures: list) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data) -> None:
        case = data.draw(strategy)
        resp = case.call(base_url=server, timeout=120)
        counts[resp.status_code] += 1
        if resp.status_code >= 500:
            failures.append(
                f"{case.method} {case.formatted_path} -> {resp.status_code}: {resp.text[:200]}"
            )

    try:
        run()
    except Unsatisfiable:  # nothing to break in an operation without inputs (negative mode)
        pass


def test_openapi_fuzz_finds_no_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    volume = np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32)
    body, headers = raw_volume_request(volume, np.eye(4))
    sid = httpx.post(f"{server}/v1/sessions", content=body, headers=headers).json()["session_id"]
    counts: Counter = Counter()
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for op in operations:
        # The nnInteractive routes declare only headers (their bodies are raw): negative data
        # for them is mostly rejected while generating, which costs time and tests little.
        modes = [GenerationMode.POSITIVE]
        if op.path.startswith("/v1/"):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            fuzz(op.as_strategy(mode), server, EXAMPLES, counts, failures)
            if "{session_id}" in op.path and op.method.upper() != "DELETE":
                live = op.as_strategy(mode, path_parameters={"session_id": sid})
                fuzz(live, server, EXAMPLES_LIVE, counts, failures)
    print(f"\nfuzz: {sum(counts.values())} requests, status counts {dict(sorted(counts.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(f"{server}/v1/health").status_code == 200
    assert sum(counts.values()) > 150
