"""The scan domain: image references, Trivy arguments, report parsing and storage."""
