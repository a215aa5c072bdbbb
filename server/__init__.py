"""Coordinator: the ServerApp and its steps (discovery, charging, rounds, release), with
privacy as a strategy wrapper (``server.strategy.PrivateStrategy``)."""
