"""Issue 10, deliver 10: a bounded schemathesis run against /api/schema/ (in process, through Django's WSGI
handler, on the test database): no operation may answer 5xx or a body that violates its own schema.

Bounded: a few examples per operation, no shrinking, a fixed seed; marked slow (about a minute on 2 cores).
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

EXAMPLES_PER_OPERATION = 12


@pytest.fixture
def api_schema(db, django_user_model):
    from django.core.signals import request_finished, request_started
    from django.core.wsgi import get_wsgi_application
    from django.db import close_old_connections

    # As Django's test client does: requests must not close the connection holding the test transaction.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)

    from apps.core.services import api_key_create
    from apps.knowledge.models import KnowledgeBase

    # A superuser's key with every scope reaches every operation's real code, not just the 403 path.
    root = django_user_model.objects.create_superuser("fuzz-root", "root@example.com", "pw-root-123")
    KnowledgeBase.objects.get_or_create(slug="fuzz", defaults={"name": "Fuzz", "owner": root, "is_public": True})
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())
    schema.fuzz_headers = {"Authorization": f"Bearer {api_key_create(user=root).raw_key}"}
    yield schema
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.mark.slow
def test_api_never_answers_5xx_or_off_schema(api_schema, settings_override):
    """Every operation of the schema, each with its own bounded hypothesis run (schemathesis's pytest plugin
    does not load under this pytest, so the operations are driven through its Python API)."""
    from hypothesis import given

    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 15  # the whole API, not an empty schema

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(headers=api_schema.fuzz_headers)
            case.validate_response(response, checks=CHECKS)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # collect all operations' failures, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)


@pytest.fixture
def settings_override(settings, tmp_path):
    # Generous rate limits (hundreds of requests in seconds are the point here), inline tasks.
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"user": "100000/min",
                                                                                      "chat": "100000/min"}}
    return settings
