"""SecAPI: one REST API in front of Trivy, embedded or Kubernetes-native.

The distribution installs one import name, ``secapi``. Its layers live in
top-level folders of the repository and install as subpackages:
``secapi.core`` (``core/``), ``secapi.api`` (``api/``) and
``secapi.operator`` (``operator/``).
"""

__version__ = "0.1.0"
