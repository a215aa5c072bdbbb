"""The run record: RunSpec (every run setting), RunStatus and its transitions
(``runs.lifecycle``). The launchers and workers that start runs live in ``orchestration``.

Kept import-light: ``server`` and ``serving`` read ``runs.spec``, ``runs.status`` and
``runs.lifecycle``; ``runs`` imports only ``models``, ``privacy`` and ``tenancy`` (its table).
"""
