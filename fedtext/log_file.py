"""Quiet output: the libraries' logs and warnings go to a file, a person reads fedtext's lines.

Flower, Ray, Opacus, Alembic, uvicorn and Python's warnings are written to
``DATA_DIR/logs/fedtext.log`` (the path is printed by the commands that train); with
``--verbose`` (or ``FEDTEXT_VERBOSE=1``) they are shown on standard error as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

LOG_FILE = "fedtext.log"
# Loggers that attach their own console handlers (Flower) or are chatty at INFO.
LIBRARY_LOGGERS = ("flwr", "ray", "alembic", "opacus", "uvicorn", "httpx", "filelock", "urllib3")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _State:
    path: Path | None = None
    verbose: bool = False
    handlers: ClassVar[list[logging.Handler]] = []


def verbose_from_env() -> bool:
    return os.environ.get("FEDTEXT_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def log_path(data_dir: Path) -> Path:
    return data_dir / "logs" / LOG_FILE


def setup(data_dir: Path, *, verbose: bool = False) -> Path:
    """Send library logs and Python warnings to the log file (and to stderr if ``verbose``).

    Safe to call again (a later call replaces the handlers of an earlier one); returns the
    log file's path.
    """
    verbose = verbose or verbose_from_env()
    path = log_path(data_dir).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in _State.handlers:
        root.removeHandler(handler)
        handler.close()
    for handler in list(root.handlers):  # e.g. Opacus's basicConfig at import, to stderr
        if _to_console(handler):
            root.removeHandler(handler)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    _State.handlers = [file_handler]
    if verbose:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(_FORMAT))
        _State.handlers.append(stream)
    for handler in _State.handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:
        quiet_library_logger(name)
    # Flower's logger prints through its own console handler, at DEBUG in places.
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file
    warnings.simplefilter("default")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _State.path, _State.verbose = path, verbose
    return path


def _to_console(handler: logging.Handler) -> bool:
    """A handler that writes to the process's standard output or error (not ours)."""
    if handler in _State.handlers or not isinstance(handler, logging.StreamHandler):
        return False
    stream = getattr(handler, "stream", None)
    return stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def quiet_library_logger(name: str) -> None:
    """Remove a library's own console handlers so that its records reach only ours."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if _to_console(handler):
            logger.removeHandler(handler)
    logger.propagate = True


def current() -> Path | None:
    """The log file of this process, once :func:`setup` ran."""
    return _State.path


def is_verbose() -> bool:
    return _State.verbose


@contextlib.contextmanager
def library_output_to_log() -> Iterator[None]:
    """Within: whatever is written to file descriptors 1 and 2 by others (Ray's processes,
    C++ extensions, libraries that print) goes to the log file; Python code that writes to
    ``sys.stdout`` (the console, the live table) still reaches the terminal.

    A no-op when verbose or before :func:`setup`.
    """
    path = _State.path
    if path is None or _State.verbose:
        yield
        return
    for name in LIBRARY_LOGGERS:  # handlers a library attached since setup (Flower at import)
        quiet_library_logger(name)
    for handler in list(logging.getLogger().handlers):
        if _to_console(handler):
            logging.getLogger().removeHandler(handler)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal_out = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8")
    terminal_err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8")
    real_out, real_err = sys.stdout, sys.stderr
    with path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout, sys.stderr = (
            _Redirect(real_out, terminal_out),
            _Redirect(real_err, terminal_err),
        )
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = real_out, real_err
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal_out.close()
            terminal_err.close()


class _Redirect:
    """``sys.stdout``/``sys.stderr`` as the terminal's, whatever fd 1/2 point at meanwhile."""

    def __init__(self, original: object, terminal: object) -> None:
        self._original = original
        try:  # a stream on fd 1 or 2 now writes to the log: write to the saved terminal
            on_fd = original.fileno() in (1, 2)  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):  # e.g. a test runner's capture
            on_fd = False
        self._terminal = terminal if on_fd else original

    def write(self, text: str) -> int:
        return self._terminal.write(text)  # type: ignore[attr-defined,no-any-return]

    def flush(self) -> None:
        self._terminal.flush()  # type: ignore[attr-defined]

    def isatty(self) -> bool:
        return self._original.isatty()  # type: ignore[attr-defined,no-any-return]

    def fileno(self) -> int:
        return self._terminal.fileno()  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._original, name)


# Libraries whose records a serving process keeps in the log file, whatever its own
# handlers print (the API's JSON request lines stay on standard output).
SERVING_QUIET = ("alembic", "flwr", "ray", "opacus", "py.warnings")


def keep_in_file(names: tuple[str, ...] = SERVING_QUIET) -> None:
    """Route these loggers to the log file only (not verbose, after :func:`setup`): for a
    command that sets up its own console logging afterwards, as `fedtext serve` does."""
    if _State.verbose or not _State.handlers:
        return
    for name in names:
        logger = logging.getLogger(name)
        for handler in _State.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = False
