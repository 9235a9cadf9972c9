"""The error table shared by the service and its client: every row round-trips (error -> status -> the
same error), checked row by row on the table and, for four of them, through a real ``refmodel serve``."""

from __future__ import annotations

import pytest

from refmodel import ReferenceClient
from refmodel.errors import (
    ConfigError,
    DataFormatError,
    FingerprintMismatch,
    InvalidBatch,
    InvalidInput,
    ModelNotAllowed,
    RequestTooLarge,
    ServiceError,
    ServiceOverloaded,
    StoreMiss,
    Unauthorized,
)
from refmodel.remote.errors import BY_STATUS, ERROR_TABLE, RETRY_STATUSES, error_for, status_for
from refmodel.serve.errors import ERROR_STATUSES
from refmodel.testing import ServeProcess

TOKEN = "table-token"


def _raised(row):
    """An exception the server could raise for ``row``."""
    if issubclass(row.raised_as, ServiceError):
        return row.raised_as("why", status=row.status)
    return row.raised_as("why")


@pytest.mark.parametrize("row", ERROR_TABLE, ids=lambda row: str(row.status))
def test_every_row_round_trips(row):
    err = error_for(row.status, "why")
    assert type(err) is row.error and str(err) == f"reference service answered {row.status}: why"
    if isinstance(err, ServiceError):
        assert err.status == row.status
    if row.raised_as is None:  # answered by the guard before a route runs: no exception to map
        return
    assert status_for(_raised(row)) == row.status
    assert status_for(err) == row.status  # what the client raises would leave the server as the same status


def test_the_table_is_the_services_and_the_clients():
    assert ERROR_STATUSES == {row.status: row.meaning for row in ERROR_TABLE}  # the OpenAPI descriptions
    assert RETRY_STATUSES == (429, 503) and set(BY_STATUS) == {401, 404, 408, 413, 422, 429, 431, 503}


def test_any_bad_input_is_422_anything_else_500():
    for exc in (InvalidInput("x"), InvalidBatch("x"), ConfigError("x"), DataFormatError("x")):
        assert status_for(exc) == 422, exc
    assert status_for(ServiceOverloaded("full")) == 429  # no status given: the first of its rows
    for exc in (StoreMiss("x"), FingerprintMismatch("x"), RuntimeError("x")):
        assert status_for(exc) == 500, exc
    err = error_for(500, "internal error")
    assert type(err) is ServiceError and err.status == 500


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    (root / "token").write_text(TOKEN)
    (root / "token").chmod(0o600)
    proc = ServeProcess(["--model", f"tiny={tiny_model_dirs['llama']}", "--token-file", root / "token",
                         "--max-body-bytes", 4096], root / "server.log", token=TOKEN)
    yield proc
    proc.stop()


@pytest.mark.integration
@pytest.mark.parametrize("case", ["unknown model", "token out of vocabulary", "wrong token", "body too large"])
def test_a_real_service_and_client_agree(server, case):
    """The service raises the error, answers the table's status, and the client raises the same class."""
    token, model, ids, want, status = {
        "unknown model": (TOKEN, "nope", [[1, 2, 3]], ModelNotAllowed, 404),
        "token out of vocabulary": (TOKEN, "tiny", [[1, 10**6, 2]], InvalidBatch, 422),
        "wrong token": ("wrong", "tiny", [[1, 2, 3]], Unauthorized, 401),
        "body too large": (TOKEN, "tiny", [list(range(1, 2000))], RequestTooLarge, 413),
    }[case]
    with ReferenceClient(server.url, token=token, max_retries=0) as client:
        with pytest.raises(want, match=f"answered {status}") as info:
            client.compute_log_probs(model, ids)
    assert type(info.value) is BY_STATUS[status].error
    assert status_for(info.value) == status
