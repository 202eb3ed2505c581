"""The Kubernetes operator (Kopf) that turns Scan resources into Trivy Jobs.

This folder installs as ``secapi.operator``. When a Python process starts in
the repository root, the root is first on ``sys.path`` and ``import operator``
finds this folder instead of the standard library module, which pip and the
standard library itself import. In that case the block below loads the
standard library module into ``sys.modules``, where the import statement
takes its result from, so the caller gets the real ``operator``.
"""

if __name__ == "operator":
    import os
    import sys
    from importlib.machinery import SourceFileLoader

    # NOTE: only modules that never import `operator` may be used here, because
    # collections (and so importlib.util and contextlib) may be mid-import.
    _path = os.path.join(os.path.dirname(os.__file__), "operator.py")
    _module = type(sys)("operator")
    _module.__file__ = _path
    sys.modules["operator"] = _module
    SourceFileLoader("operator", _path).exec_module(_module)
