"""Issue #13's shape of the compiler (passes with one job each over one declared state) and of the roles:
no monoliths."""

from __future__ import annotations

import ast
from pathlib import Path

COMPILER = Path(__file__).resolve().parents[2] / "compiler"
PASSES = ["resolve", "schema", "scenario", "shapes", "train", "trust", "flows", "flow_rules", "check"]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _parse(name: str) -> ast.Module:
    return ast.parse((COMPILER / f"{name}.py").read_text(encoding="utf-8"))


ROLES = COMPILER.parent / "runtime" / "roles"


def test_no_compiler_or_role_module_or_function_is_a_monolith() -> None:
    """The compiler's passes and the runtime's roles (issue #13 sets both limits)."""
    too_big: list[str] = []
    for path in [*sorted(COMPILER.glob("*.py")), *sorted(ROLES.glob("*.py"))]:
        src = path.read_text(encoding="utf-8")
        if len(src.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{path.name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.name}: {node.name} is {n} lines")
    assert not too_big, "split these (issue #13):\n" + "\n".join(too_big)


def _declared_state() -> set[str]:
    """Attributes CheckState.__init__ declares (assigned or annotated on self)."""
    cls = next(n for n in _parse("checkstate").body if isinstance(n, ast.ClassDef) and n.name == "CheckState")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    out: set[str] = set()
    for node in ast.walk(init):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for t in targets:
            for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                    out.add(e.attr)
    return out


def _state_writes(name: str, state_names: tuple[str, ...]) -> set[str]:
    """Attributes module ``name`` assigns on the checker state (``ck.x = ...``, ``c.x = ...``)."""
    out: set[str] = set()
    for node in ast.walk(_parse(name)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign | ast.AugAssign) else []
        for t in targets:
            for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) \
                        and e.value.id in state_names:
                    out.add(e.attr)
    return out


def test_every_attribute_a_pass_sets_is_declared_in_the_state() -> None:
    declared = _declared_state()
    assert {"loss_name", "partition", "roles", "logits_t", "label_t", "loss", "train_items"} <= declared
    undeclared = {f"{m}: {a}" for m in PASSES for a in _state_writes(m, ("ck", "c")) - declared}
    # check.py's Checker is the state itself: its methods set only what __init__ declared.
    undeclared |= {f"check: {a}" for a in _state_writes("check", ("self",)) - declared}
    assert not undeclared, f"declare these in CheckState.__init__: {sorted(undeclared)}"


def test_passes_do_not_import_the_driver() -> None:
    """Data flows one way: the passes get the state; only check.py (the driver) knows the pass order."""
    for m in PASSES:
        if m == "check":
            continue
        for node in ast.walk(_parse(m)):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "fldsl.compiler.check", f"{m}.py imports the driver"
