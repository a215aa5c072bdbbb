"""What the runs API needs from whoever starts training runs (injected by ``fedtext``)."""

from __future__ import annotations

from typing import Any, Protocol


class RunLauncher(Protocol):
    """Starts and stops the worker of a run recorded in the database."""

    def check(self, config: dict[str, Any]) -> None:
        """Raise ValueError, with a message for the user, when ``config`` cannot run."""

    def launch(self, run_id: str) -> int:
        """Start the run's worker in the background; return its process id."""

    def cancel(self, run_id: str, pid: int | None) -> None:
        """Stop the run's worker (and what it started) if it still runs; remove what it
        kept on disk."""

    def sweep(self) -> list[str]:
        """Remove what ended runs' workers left on disk; the run ids."""
