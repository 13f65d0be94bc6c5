"""Fixtures for the core tests."""

import pytest

from doconv.cases import CASES


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request):
    return request.param
