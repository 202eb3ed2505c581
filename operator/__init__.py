"""The Kubernetes operator (Kopf) that turns Scan resources into Trivy Jobs."""
