"""Coordinator: ServerApp, strategy assembly, budget gate, model release."""
