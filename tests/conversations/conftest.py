"""Fixtures shared by the conversations tests."""
import pytest

from tests.conversations.conv_support import build_knowledge_base, reset_conversation_runtime


@pytest.fixture(autouse=True)
def _fresh_runtime():
    """Session store and generators are process singletons: each test starts from new ones."""
    reset_conversation_runtime()
    yield
    reset_conversation_runtime()


@pytest.fixture
def kb(user):
    return build_knowledge_base(user)
