"""Executors: where a scan runs (local Trivy processes or Kubernetes Jobs)."""

from secapi.core.executors.base import Executor, create_executor

__all__ = ["Executor", "create_executor"]
