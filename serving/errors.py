"""Error responses that never fail themselves: every refusal is a JSON body.

FastAPI's own 422 handler echoes the offending input; when that input is NaN, Infinity
(or 1e400, which JSON parsing makes infinite) or a string with a lone surrogate, the
echo cannot be encoded and the client got a 500 instead of its 422. Text that is not
Unicode (a lone surrogate) that passes validation fails where it is stored; that is the
client's mistake too, so it is a 422 naming the cause, not a 500.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError, OperationalError, StatementError
from starlette.responses import JSONResponse

NOT_UNICODE = (
    "The request holds text that is not valid Unicode (a lone surrogate such as \\ud800); "
    "send UTF-8 text."
)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings and lone surrogates replaced (U+FFFD)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return value
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


def _is_not_unicode(exc: BaseException) -> bool:
    if isinstance(exc, UnicodeEncodeError):
        return True
    return isinstance(exc, StatementError) and isinstance(exc.orig, UnicodeEncodeError)


async def _not_unicode(_: Request, exc: Exception) -> JSONResponse:
    if not _is_not_unicode(exc):
        raise exc  # another statement error: a server fault, handled as one
    return JSONResponse({"detail": NOT_UNICODE}, status_code=422)


async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
    # The database went away (restarted, connections killed): a truthful 503 the client may
    # retry, not a 500 (tests/faults, PostgreSQL restarted while serving).
    if isinstance(exc, DBAPIError) and not (
        isinstance(exc, OperationalError) or exc.connection_invalidated
    ):
        raise exc
    return JSONResponse(
        {"detail": "The database is unavailable; retry shortly."},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the exception and its traceback; the client gets neither.
    return JSONResponse({"detail": "Internal server error."}, status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    """Install the handlers above on ``app``."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(UnicodeEncodeError, _not_unicode)
    app.add_exception_handler(StatementError, _not_unicode)
    app.add_exception_handler(DBAPIError, _database_unavailable)
    app.add_exception_handler(Exception, _server_error)
