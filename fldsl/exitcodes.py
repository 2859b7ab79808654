"""The process exit codes of every ``fldsl`` command and node (README "Exit codes"): one home, so that the
CLI, the launcher that reads a node's code and the node that exits with it cannot drift apart."""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUN_FAILED = 1  # a node failed, training failed
EXIT_INPUT = 2  # bad .flp, bad data rows, bad flags, missing data files
EXIT_TRUST = 3  # attestation refused, peer refused, tampered sealed file
EXIT_ENV = 4  # a required tool is missing (Graphviz `dot`, Gramine)
EXIT_INTERRUPTED = 130  # Ctrl-C; the last checkpoint stays usable
