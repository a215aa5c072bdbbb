"""Launchers and workers: simulation, run worker, federation submission, Flower glue;
above server and clients."""
