"""Schemathesis drives the app from its own OpenAPI schema: no input it generates may cause a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from service.app import create_app
from service.config import Settings


def test_no_server_errors_and_json_details(loaded_model, tile_model_dir):
    app = create_app(Settings(model_dir=tile_model_dir, max_pixels=1_000_000), loaded_model)
    app.state.ready = True  # the model is loaded; requests go straight to it
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/segment", "/segment/batch", "/healthz", "/readyz", "/model", "/metrics"}
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            if 400 <= response.status_code < 500:
                assert isinstance(response.json()["detail"], str)

        check()
