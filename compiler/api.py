"""``fldsl.compiler.api``: the compiler entry points (implemented in :mod:`fldsl.api`)."""

from fldsl.api import (
    CompileResult,
    Program,
    check,
    check_source,
    compile_pipeline,
    load_or_compile,
    task_graph,
)

__all__ = [
    "CompileResult",
    "Program",
    "check",
    "check_source",
    "compile_pipeline",
    "load_or_compile",
    "task_graph",
]
