"""The test bed: real PostgreSQL, Redis, registry, Trivy and Kubernetes on loopback.

`python -m tests.testbed up|down|status` manages it; see README.md beside this file.
"""
