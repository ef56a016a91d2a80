"""How the store classifies what PostgREST (or the gateway in front of it) answered."""

import pytest
from postgrest.exceptions import APIError

from worker.store import (
    BatchChangedError,
    StaleLeaseError,
    StoreError,
    TransientStoreError,
    _error_from,
)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("PT409", StaleLeaseError),  # the run's lease is stale: our work has no effect
        ("PT412", BatchChangedError),  # evidence or modules changed: read the batch again
        ("PT422", StoreError),  # the twin's cursor moved past the batch: the run fails
        ("PGRST001", TransientStoreError),  # PostgREST cannot reach the database
        ("PGRST003", TransientStoreError),  # no database connection free in time
        ("57P01", TransientStoreError),  # the database is shutting down
        ("55P03", TransientStoreError),  # the claim's lock wait timed out
        ("502", TransientStoreError),  # nginx: PostgREST is restarting
        ("503", TransientStoreError),
        ("429", TransientStoreError),
        ("23514", StoreError),  # a check constraint: retrying cannot help
        ("22023", StoreError),  # a bad argument
        ("400", StoreError),  # a gateway's 4xx
        (None, TransientStoreError),  # no code: the answer broke off
        ("", TransientStoreError),
    ],
)
def test_error_classification(code, expected):
    error = _error_from(APIError({"message": "m", "code": code, "hint": None, "details": None}))
    assert type(error) is expected
    assert error.code == code
