"""Trust layer: SGX quotes, attestation backends (sim / Gramine), RA-TLS certificates, peer verification.

Import the submodules directly (``fldsl.runtime.attestation.ratls``, ``.verify``, ``.sim``, ...); this package
file stays empty of imports so that loading one piece never drags in the others.
"""
