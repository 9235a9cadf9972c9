"""Fixtures for the reference-strategy tests (helpers live in ref_helpers.py: conftest names collide)."""

import pytest
from ref_helpers import make_batch


@pytest.fixture
def batch(tiny):
    """A right-padded preference batch ``(input_ids, attention_mask, score_mask)`` for the tiny model."""
    return make_batch(tiny[1])
