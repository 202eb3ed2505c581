"""Executors: where a scan runs (local Trivy processes or Kubernetes Jobs)."""
