"""Kubernetes pods as billable resources: exact quantities, the scheduler's effective request,
each pod's running span, listing and watching through lightkube."""
