"""fedtext: federated, differentially private, multi-tenant text classification."""

__version__ = "0.1.0"
