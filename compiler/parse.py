"""Parse ``.flp`` source into the typed AST (``fldsl.compiler.ast``), translating lark errors to diagnostics.

The grammar (``fldsl.grammar/fldsl.lark``) is LALR with lark's contextual lexer, so a syntax error is found
at the first token that cannot continue any statement: we report that token's position and the expected
tokens in words (a keyword as `` `party` ``, ``NAME`` as "a party name" depending on the keyword before it).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.lexer import PatternStr

from fldsl.compiler import ast
from fldsl.diagnostics import Diagnostic, FldslError, did_you_mean


@lru_cache(maxsize=1)
def _parser() -> Lark:
    text = resources.files("fldsl.grammar").joinpath("fldsl.lark").read_text(encoding="utf-8")
    return Lark(text, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True)


def _span_tok(t: Token) -> ast.Span:
    line, col = t.line or 1, t.column or 1
    return ast.Span(line, col, t.end_line or line, t.end_column or col + 1)


def _span_meta(meta: Any) -> ast.Span:
    if getattr(meta, "empty", True):
        return ast.Span(1, 1, 1, 2)
    return ast.Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _name(t: Token) -> ast.Name:
    return ast.Name(str(t), _span_tok(t))


class _SyntaxProblem(Exception):
    """A token that parses but is not a valid value (e.g. an integer literal out of range)."""

    def __init__(self, message: str, span: ast.Span):
        super().__init__(message)
        self.span = span


def _number(t: Token) -> ast.Literal_:
    text = str(t)
    span = _span_tok(t)
    if any(c in text for c in ".eE"):
        value = float(text)
        if value != value or value in (float("inf"), float("-inf")):
            raise _SyntaxProblem(f"number `{text}` is out of range", span)
        return ast.Literal_("float", value, span)
    if len(text.lstrip("-")) > 18:
        raise _SyntaxProblem(f"integer `{text}` is too large", span)
    return ast.Literal_("int", int(text), span)


def _string(t: Token) -> ast.Literal_:
    try:
        value = json.loads(str(t))
    except ValueError as e:
        raise _SyntaxProblem(f"invalid escape in string {t}", _span_tok(t)) from e
    return ast.Literal_("str", value, _span_tok(t))


@v_args(meta=True)
class _ToAst(Transformer[Token, ast.Module]):
    # --- expressions ---------------------------------------------------------------------------------
    def number(self, meta: Any, c: list[Token]) -> ast.Literal_:
        return _number(c[0])

    def string(self, meta: Any, c: list[Token]) -> ast.Literal_:
        return _string(c[0])

    def true(self, meta: Any, c: list[Token]) -> ast.Literal_:
        return ast.Literal_("bool", True, _span_tok(c[0]))

    def false(self, meta: Any, c: list[Token]) -> ast.Literal_:
        return ast.Literal_("bool", False, _span_tok(c[0]))

    def none(self, meta: Any, c: list[Token]) -> ast.Literal_:
        return ast.Literal_("none", None, _span_tok(c[0]))

    def ref(self, meta: Any, c: list[Token]) -> ast.Ref:
        return ast.Ref([_name(t) for t in c], _span_meta(meta))

    def list_expr(self, meta: Any, c: list[Any]) -> ast.ListExpr:
        return ast.ListExpr([x for x in c if x is not None], _span_meta(meta))

    def binop(self, meta: Any, c: list[Any]) -> ast.BinOp:
        return ast.BinOp(str(c[1]), c[0], c[2], _span_meta(meta))

    def kwarg(self, meta: Any, c: list[Any]) -> ast.Arg:
        return ast.Arg(_name(c[0]), c[1], _span_meta(meta))

    def call(self, meta: Any, c: list[Any]) -> ast.Call:
        args = []
        for a in c[1:]:
            if a is None:
                continue
            args.append(a if isinstance(a, ast.Arg) else ast.Arg(None, a, _span_of(a)))
        return ast.Call(_name(c[0]), args, _span_meta(meta))

    # --- schedules -----------------------------------------------------------------------------------
    def every_step(self, meta: Any, c: list[Token]) -> ast.Schedule:
        return ast.Schedule("step", 1, _span_meta(meta))

    def every_steps(self, meta: Any, c: list[Token]) -> ast.Schedule:
        n = _number(c[1])
        if n.kind != "int":
            raise _SyntaxProblem(f"the step count must be a whole number, got `{c[1]}`", n.span)
        return ast.Schedule("steps", int(n.value), _span_meta(meta))  # type: ignore[arg-type]

    def every_epoch(self, meta: Any, c: list[Token]) -> ast.Schedule:
        return ast.Schedule("epoch", None, _span_meta(meta))

    # --- declarations --------------------------------------------------------------------------------
    def header(self, meta: Any, c: list[Token]) -> ast.Name:
        return _name(c[0])

    def param_decl(self, meta: Any, c: list[Any]) -> ast.ParamDecl:
        return ast.ParamDecl(_name(c[0]), _name(c[1]), c[2], _span_meta(meta))

    def name_list(self, meta: Any, c: list[Token]) -> list[ast.Name]:
        return [_name(t) for t in c]

    def use_decl(self, meta: Any, c: list[Any]) -> ast.UseDecl:
        names = c[-1] if c and isinstance(c[-1], list) else None
        parts = [_name(t) for t in c if isinstance(t, Token)]
        return ast.UseDecl(parts, names, _span_meta(meta))

    def index_range(self, meta: Any, c: list[Token]) -> ast.Range:
        lo, hi = _number(c[0]), _number(c[2])
        for n in (lo, hi):
            if n.kind != "int":
                raise _SyntaxProblem("a range bound must be a whole number", n.span)
        return ast.Range(int(lo.value), int(hi.value), _span_meta(meta))  # type: ignore[arg-type]

    def node_decl(self, meta: Any, c: list[Any]) -> ast.NodeDecl:
        return ast.NodeDecl(_name(c[0]), c[1], _span_meta(meta))

    def data_decl(self, meta: Any, c: list[Any]) -> ast.DataDecl:
        return ast.DataDecl(_name(c[0]), c[1], _span_meta(meta), c[2])

    def rows_bound(self, meta: Any, c: list[Any]) -> ast.RowsBound:
        return ast.RowsBound(c[0], _span_meta(meta))

    def column_name(self, meta: Any, c: list[Token]) -> ast.Name:
        tok = c[0]
        if tok.type == "STRING":
            return ast.Name(str(_string(tok).value), _span_tok(tok))
        return _name(tok)

    def column_decl(self, meta: Any, c: list[Any]) -> ast.ColumnDecl:
        cols = [x for x in c[1:] if isinstance(x, ast.Name)]
        opts = [x for x in c[1:] if not isinstance(x, ast.Name)]
        return ast.ColumnDecl(_name(c[0]), cols, _span_meta(meta), opts)

    def fill(self, meta: Any, c: list[Any]) -> tuple[ast.Name, ast.Expr | None]:
        return _name(c[0]), (c[1] if len(c) > 1 else None)

    def _missing(self, meta: Any, token: Token | None, fill: Any, indicator: Token | None) -> ast.MissingOpt:
        how, value = fill if fill is not None else (None, None)
        return ast.MissingOpt(_string(token) if token is not None else None, how, value,
                              _name(indicator) if indicator is not None else None, _span_meta(meta))

    def missing_token(self, meta: Any, c: list[Any]) -> ast.MissingOpt:
        return self._missing(meta, c[0], c[1], c[2])

    def missing_fill(self, meta: Any, c: list[Any]) -> ast.MissingOpt:
        return self._missing(meta, None, c[0], c[1])

    def missing_flag(self, meta: Any, c: list[Any]) -> ast.MissingOpt:
        return self._missing(meta, None, None, c[0])

    def scale_plain(self, meta: Any, c: list[Token]) -> ast.ScaleOpt:
        return ast.ScaleOpt(_name(c[0]), None, None, _span_meta(meta))

    def scale_clip(self, meta: Any, c: list[Any]) -> ast.ScaleOpt:
        return ast.ScaleOpt(_name(c[0]), c[1], c[2], _span_meta(meta))

    def vocabulary_opt(self, meta: Any, c: list[Any]) -> ast.VocabularyOpt:
        return ast.VocabularyOpt(c[0], _span_meta(meta))

    def hash_opt(self, meta: Any, c: list[Any]) -> ast.HashOpt:
        return ast.HashOpt(c[0], _span_meta(meta))

    def bucketize_opt(self, meta: Any, c: list[Any]) -> ast.BucketizeOpt:
        return ast.BucketizeOpt(c[0], _span_meta(meta))

    def schema_block(self, meta: Any, c: list[Any]) -> ast.SchemaBlock:
        return ast.SchemaBlock(
            [i for i in c if isinstance(i, ast.RowsBound)],
            [i for i in c if isinstance(i, ast.ColumnDecl)],
            _span_meta(meta),
        )

    def party_decl(self, meta: Any, c: list[Any]) -> ast.PartyDecl:
        name, rng, desc = _name(c[0]), c[1], c[2]
        items = c[3:]
        return ast.PartyDecl(
            name,
            rng,
            _string(desc).value if desc is not None else None,  # type: ignore[arg-type]
            [i for i in items if isinstance(i, ast.NodeDecl)],
            [i for i in items if isinstance(i, ast.DataDecl)],
            _span_meta(meta),
        )

    # --- partitions ----------------------------------------------------------------------------------
    def align_stmt(self, meta: Any, c: list[Any]) -> ast.AlignStmt:
        return ast.AlignStmt(list(c[:-2]), _name(c[-2]), c[-1], _span_meta(meta))

    def vertical(self, meta: Any, c: list[Any]) -> ast.VerticalPartition:
        return ast.VerticalPartition([a for a in c[1:]], _span_meta(meta))

    def horizontal(self, meta: Any, c: list[Any]) -> ast.HorizontalPartition:
        _kw, over, server, sched, reduce = c
        red = _name(reduce) if reduce else None
        return ast.HorizontalPartition(over, server, sched, red, _span_meta(meta))

    def distributed(self, meta: Any, c: list[Any]) -> ast.DistributedPartition:
        _kw, chief, workers, server, strategy = c
        return ast.DistributedPartition(chief, workers, server, _name(strategy), _span_meta(meta))

    # --- model / train / trust -----------------------------------------------------------------------
    def assign(self, meta: Any, c: list[Any]) -> ast.Assign:
        at, target, value = c
        return ast.Assign(_name(at) if at is not None else None, _name(target), value, _span_meta(meta))

    def loss_stmt(self, meta: Any, c: list[Any]) -> ast.LossStmt:
        return ast.LossStmt(c[0], _span_meta(meta))

    def model_block(self, meta: Any, c: list[Any]) -> ast.ModelBlock:
        return ast.ModelBlock(list(c), _span_meta(meta))

    def train_item(self, meta: Any, c: list[Any]) -> ast.TrainItem:
        return ast.TrainItem(_name(c[0]), c[1], _span_meta(meta))

    def train_block(self, meta: Any, c: list[Any]) -> ast.TrainBlock:
        return ast.TrainBlock(list(c), _span_meta(meta))

    def enclave_stmt(self, meta: Any, c: list[Any]) -> ast.EnclaveStmt:
        return ast.EnclaveStmt(c[0], _span_meta(meta))

    def attestation_stmt(self, meta: Any, c: list[Token]) -> ast.AttestationStmt:
        return ast.AttestationStmt(_name(c[0]), _span_meta(meta))

    def at_rest_stmt(self, meta: Any, c: list[Token]) -> ast.AtRestStmt:
        return ast.AtRestStmt(_name(c[0]), _span_meta(meta))

    def plain_tensor(self, meta: Any, c: list[Any]) -> ast.TensorPat:
        return ast.TensorPat(None, c[0], _span_meta(meta))

    def wrapped_tensor(self, meta: Any, c: list[Token]) -> ast.TensorPat:
        inner = ast.Ref([_name(c[1])], _span_tok(c[1]))
        return ast.TensorPat(_name(c[0]), inner, _span_meta(meta))

    def type_spec(self, meta: Any, c: list[Token]) -> ast.TypeSpecExpr:
        dims: list[ast.Name | ast.Literal_] = [_number(t) if t.type == "NUMBER" else _name(t) for t in c[1:]]
        return ast.TypeSpecExpr(_name(c[0]), dims, _span_meta(meta))

    def ref_list(self, meta: Any, c: list[ast.Ref]) -> list[ast.Ref]:
        return list(c)

    def allow_stmt(self, meta: Any, c: list[Any]) -> ast.AllowStmt:
        srcs, _arrow, dsts, tensor, as_type = c
        text = f"allow {', '.join(r.text for r in srcs)} -> {', '.join(r.text for r in dsts)}: {tensor.text}"
        return ast.AllowStmt(srcs, dsts, tensor, as_type, _span_meta(meta), text)

    def trust_block(self, meta: Any, c: list[Any]) -> ast.TrustBlock:
        return ast.TrustBlock(list(c), _span_meta(meta))

    def start(self, meta: Any, c: list[Any]) -> ast.Module:
        mod = ast.Module(name=c[0])
        for item in c[1:]:
            match item:
                case ast.ParamDecl():
                    mod.params.append(item)
                case ast.UseDecl():
                    mod.uses.append(item)
                case ast.PartyDecl():
                    mod.parties.append(item)
                case ast.VerticalPartition() | ast.HorizontalPartition() | ast.DistributedPartition():
                    mod.partitions.append(item)
                case ast.ModelBlock():
                    mod.models.append(item)
                case ast.TrainBlock():
                    mod.trains.append(item)
                case ast.TrustBlock():
                    mod.trusts.append(item)
        return mod


def _span_of(x: Any) -> ast.Span:
    return x.span if hasattr(x, "span") else ast.Span(1, 1, 1, 2)


# --- error translation -----------------------------------------------------------------------------------

# What a NAME means right after a given keyword / punctuation (for "expected a party name").
_NAME_AFTER = {
    "pipeline": "a pipeline name",
    "param": "a parameter name",
    "use": "a module name (e.g. `std`)",
    "party": "a party name",
    "node": "a node name",
    "data": "a data set name",
    "at": "a party name",
    "allow": "a party name",
    "->": "a party name",
    "over": "a party name",
    "from": "a `party.node`",
    "to": "a `party.node`",
    "via": "a `party.node`",
    "shard": "a sharding strategy (`round_robin` or `contiguous`)",
    "with": "`mean` or `fedavg`",
    "attestation": "an attestation mode (`dcap` or `sim`)",
    "at_rest": "`encrypted` or `plain`",
    "loss": "a loss function (e.g. `softmax_cross_entropy`)",
    "enclave": "`sgx(...)`",
    "on": "an id column name",
    "using": "an alignment method (`psi.ecdh` or `join`)",
    "align": "a `party.dataset`",
    "as": "a dtype (e.g. `float32`)",
    # schema blocks: after a column type comes a column name
    "numeric": "a column name",
    "integer": "a column name",
    "category": "a column name",
    "top": "a number (the vocabulary size)",
    "constant": "a number (the fill value)",
}
_VALUE_TERMINALS = {"NAME", "NUMBER", "STRING", "LSQB", "TRUE", "FALSE", "NONE"}


_KEYWORD_RE = re.compile(r"^([a-z_]+)\\b$")


@lru_cache(maxsize=1)
def _literals() -> dict[str, str]:
    """Terminal name -> the text it matches, for punctuation and keywords (`/party\\b/` -> `party`)."""
    out: dict[str, str] = {}
    for t in _parser().terminals:
        if isinstance(t.pattern, PatternStr):
            out[t.name] = t.pattern.value
        else:
            m = _KEYWORD_RE.match(t.pattern.value)
            if m:
                out[t.name] = m.group(1)
    return out


def _terminal_words(name: str, prev: str | None) -> str:
    if name == "$END":
        return "end of file"
    if name == "NAME":
        return _NAME_AFTER.get(prev or "", "a name")
    if name == "NUMBER":
        return "a number"
    if name == "STRING":
        return "a string"
    literal = _literals().get(name)
    return f"`{literal}`" if literal is not None else name.lower()


# A value expected right after these words, in words (instead of "a value or `(`").
_VALUE_AFTER = {
    "constant": "a number (the fill value, e.g. `constant 0`)",
    "top": "a whole number (the vocabulary size, e.g. `top 100`)",
}
# The form to write, where a column option's only continuation is missing.
_OPTION_FORMS = {
    frozenset({"_TOP"}): "write `vocabulary: top K` (the K most frequent values get a column each)",
    frozenset({"_BUCKETS"}): "write `hash: N buckets`",
    frozenset({"COMMA"}): "write `clip(lo, hi)`",
}
# Schema block column options, for "did you mean `missing:`?" when a misspelt one reads as a column type.
_COLUMN_OPTIONS = ("missing", "scale", "vocabulary", "hash")


def _expected_words(expected: set[str], prev: str | None) -> str:
    if prev in _VALUE_AFTER and "NUMBER" in expected:
        return _VALUE_AFTER[prev]
    exp = set(expected)
    words: list[str] = []
    if {"NUMBER", "STRING"} <= exp and "NAME" in exp:
        exp -= _VALUE_TERMINALS
        words.append("a value")
    words += sorted({_terminal_words(t, prev) for t in exp}, key=lambda w: (not w.startswith("a"), w))
    if len(words) > 9:
        words = [*words[:8], "..."]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _tok_desc(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "STRING":
        return f"string {tok}"
    if tok.type == "NUMBER":
        return f"number `{tok}`"
    return f"`{tok}`"


def _prev(e: UnexpectedInput) -> Token | None:
    ip = getattr(e, "interactive_parser", None)
    if ip is None:
        return None
    stack = ip.parser_state.value_stack
    if stack and isinstance(stack[-1], Token):
        return stack[-1]
    return None


def _prev_token(e: UnexpectedInput) -> str | None:
    tok = _prev(e)
    return str(tok) if tok is not None else None


def _misspelt_option(e: UnexpectedToken, file: str) -> Diagnostic | None:
    """``numeric a missng: mean``: the misspelt option reads as the next line's column type, and the parser
    stops at its `:`. Point at the word instead, with the option it resembles."""
    prev = _prev(e)
    if e.token.type != "COLON" or prev is None or prev.type != "NAME":
        return None
    best = did_you_mean(str(prev), list(_COLUMN_OPTIONS))
    if best is None or prev.line is None or prev.column is None:
        return None
    return Diagnostic(
        "error",
        f"unknown column option `{prev}:`; the options are "
        + ", ".join(f"`{o}:`" for o in _COLUMN_OPTIONS),
        file,
        prev.line,
        prev.column,
        prev.end_column if prev.end_line == prev.line else None,
        f"did you mean `{best}:`?",
    )


def _end_position(source: str) -> tuple[int, int]:
    lines = source.split("\n")
    return len(lines), len(lines[-1]) + 1


def _accepts(e: UnexpectedInput, fallback: set[str]) -> set[str]:
    """The terminals the parser could take at the error (the lexer's set can be wider)."""
    ip = getattr(e, "interactive_parser", None)
    if ip is None:
        return set(fallback)
    try:
        got = set(ip.accepts())
    except Exception:  # accepts() re-runs the parser on copies; never let it mask the real error
        return set(fallback)
    return got or set(fallback)


def _keyword_hint(word: str, expected: set[str]) -> str | None:
    """``did you mean `party`?`` for a misspelt keyword."""
    keywords = [w for name, w in _literals().items() if name in expected and w.isidentifier()]
    best = did_you_mean(word, keywords)
    return f"did you mean `{best}`?" if best else None


def _syntax_diagnostic(e: UnexpectedInput, source: str, file: str) -> Diagnostic:
    prev = _prev_token(e)
    if isinstance(e, UnexpectedToken):
        e.expected = _accepts(e, set(e.expected))
        tok = e.token
        misspelt = _misspelt_option(e, file)
        if misspelt is not None:
            return misspelt
        if tok.type == "$END":
            line, col = _end_position(source)
            return Diagnostic(
                "error",
                f"unexpected end of file; expected {_expected_words(e.expected, prev)}",
                file,
                line,
                col,
            )
        hint = _keyword_hint(str(tok), e.expected) if tok.type == "NAME" else None
        return Diagnostic(
            "error",
            f"unexpected {_tok_desc(tok)}; expected {_expected_words(e.expected, prev)}",
            file,
            tok.line,
            tok.column,
            tok.end_column if tok.end_line == tok.line else None,
            hint or _OPTION_FORMS.get(frozenset(e.expected)),
        )
    if isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream
        ch = source[pos] if pos is not None and 0 <= pos < len(source) else ""
        if ch == '"':
            msg = "unterminated string (strings are one line, in double quotes)"
        elif ch.isprintable() and ch.strip():
            msg = f"unexpected character `{ch}`; expected {_expected_words(set(e.allowed), prev)}"
        else:
            msg = f"unexpected character {ch!r}; expected {_expected_words(set(e.allowed), prev)}"
        return Diagnostic("error", msg, file, e.line, e.column)
    if isinstance(e, UnexpectedEOF):
        line, col = _end_position(source)
        msg = f"unexpected end of file; expected {_expected_words(set(e.expected), prev)}"
        return Diagnostic("error", msg, file, line, col)
    at_line, at_col = getattr(e, "line", None), getattr(e, "column", None)
    return Diagnostic("error", f"syntax error: {e}", file, at_line, at_col)


MAX_DEPTH = 200  # far beyond any real pipeline; keeps the recursive passes well inside Python's stack


def _too_deep(tree: Tree[Token]) -> ast.Span | None:
    """The position of the first node deeper than MAX_DEPTH (checked iteratively), or None."""
    stack: list[tuple[Tree[Token], int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return _span_meta(node.meta)
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))
    return None


def parse(source: str, file: str = "<input>") -> ast.Module:
    """Parse a whole ``.flp`` source; raises :class:`FldslError` with one syntax diagnostic."""
    try:
        tree = _parser().parse(source)
    except UnexpectedInput as e:
        raise FldslError([_syntax_diagnostic(e, source, file)], {file: source}) from None
    deep = _too_deep(tree)
    if deep is not None:
        d = Diagnostic(
            "error",
            f"expression nested too deeply (more than {MAX_DEPTH} levels)",
            file,
            deep.line,
            deep.column,
        )
        raise FldslError([d], {file: source})
    try:
        return _ToAst().transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, _SyntaxProblem):
            sp = e.orig_exc.span
            d = Diagnostic("error", str(e.orig_exc), file, sp.line, sp.column, sp.single_line_end)
            raise FldslError([d], {file: source}) from None
        raise
