"""What a run is and where it stands: RunSpec (every run setting), RunStatus and its
transitions (``runs.lifecycle``), and the launchers and workers (``runs.simulation``,
``runs.worker``, ``runs.federation``).

Kept import-light: ``server`` reads ``runs.spec``, ``runs.status`` and ``runs.lifecycle``,
while the launchers import ``server`` for the ServerApp.
"""
