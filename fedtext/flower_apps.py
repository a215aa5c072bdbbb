"""The Flower apps that ``flwr run`` loads (``[tool.flwr.app.components]`` in pyproject).

Under the Deployment Engine the SuperLink starts the ServerApp in a subprocess that
inherits its environment, so the platform (database, blob store, key provider) comes from
the ``FEDTEXT_*`` settings of the coordinator; ``fedtext federation coordinator`` exports
them with absolute paths. The ClientApp needs no platform: a tenant node has no database
and no platform keys.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.client_app import app as client_app
from fedtext.bootstrap import platform_from_settings
from fedtext.settings import get_settings
from runs.spec import RunSpec
from server.server_app import run_federation


def platform_run_id(flower_run_id: int) -> str:
    """The platform's TrainingRun id of a Flower run started without an explicit ``run-id``.

    Deriving it from Flower's own run id lets ``fedtext federation status`` find the
    platform's record of any run, however it was started (``flwr run`` included).
    """
    return f"flwr-{flower_run_id}"


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    # As server.server_app.build_server_app, but an empty run-id becomes Flower's run id.
    own_id = {} if run_config.get("run-id") else {"run-id": platform_run_id(context.run_id)}
    cfg = RunSpec.from_run_config(run_config, own_id)
    run_federation(grid, cfg, platform_from_settings(get_settings()))


__all__ = ["client_app", "platform_run_id", "server_app"]
