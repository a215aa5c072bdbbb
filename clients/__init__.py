"""Tenant side: local data, DP training and evaluation, the Flower ClientApp."""
