"""fldsl: declarative confidential federated learning.

Kept import-light on purpose: the runtime (``fldsl.runtime``) must be importable without the parser and
``fldsl check`` without TensorFlow. The public API lives in :mod:`fldsl.api`.
"""

__version__ = "0.1.0"
