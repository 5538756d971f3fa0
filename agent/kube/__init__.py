"""Kubernetes clusters the agent meters: how it reaches and authenticates to them."""
