"""``fldsl bench``: the harness, its node wrapper (plain / native modes) and the Flower baseline.

Its own package (folder ``benchkit/``, imported as ``fldsl.bench``), outside the node's measured code
(``fldsl.measurement.code_digest`` covers fldsl, compiler, runtime, stdlib, grammar and pipelines only): the
runtime knows nothing of it, and it changes the transport only through ``Transport``'s and ``node.main``'s
arguments.
"""
