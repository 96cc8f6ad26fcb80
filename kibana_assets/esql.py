"""Offline ES|QL checks: parse with the official grammar (PyPI `esql-parser`, generated from
Elasticsearch's ANTLR grammar) and list the source fields a query references.

`esql-parser` is a test/validate dependency; importing this module without it raises ImportError.
"""
from __future__ import annotations

import re

from antlr4 import CommonTokenStream, InputStream
from antlr4.error.ErrorListener import ErrorListener
from antlr4.tree.Tree import ParseTreeWalker
from esql_parser.EsqlBaseLexer import EsqlBaseLexer
from esql_parser.EsqlBaseParser import EsqlBaseParser
from esql_parser.EsqlBaseParserListener import EsqlBaseParserListener


class EsqlSyntaxError(ValueError):
    pass


class _Collect(ErrorListener):
    def __init__(self) -> None:
        self.errors: list[str] = []

    def syntaxError(self, recognizer, offendingSymbol, line, column, msg, e):  # noqa: N802
        self.errors.append(f"line {line}:{column} {msg}")


def parse(query: str):
    """Parse one query; raises EsqlSyntaxError listing every syntax error."""
    errors = _Collect()
    lexer = EsqlBaseLexer(InputStream(query))
    lexer.removeErrorListeners()
    lexer.addErrorListener(errors)
    parser = EsqlBaseParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(errors)
    tree = parser.singleStatement()
    if errors.errors:
        raise EsqlSyntaxError("; ".join(errors.errors))
    return tree, parser


class _Names(EsqlBaseParserListener):
    def __init__(self) -> None:
        self.qualified: list[str] = []
        self.assigned: set[str] = set()
        self.dissect_patterns: list[str] = []

    def enterQualifiedName(self, ctx):  # noqa: N802
        self.qualified.append(_unquote(ctx.getText()))

    def enterField(self, ctx):  # noqa: N802
        # `name = expr` in EVAL/STATS/BY creates a column
        if ctx.qualifiedName() is not None and ctx.ASSIGN() is not None:
            self.assigned.add(_unquote(ctx.qualifiedName().getText()))

    def enterAggField(self, ctx):  # noqa: N802
        f = ctx.field()
        if f is not None and f.qualifiedName() is not None and f.ASSIGN() is not None:
            self.assigned.add(_unquote(f.qualifiedName().getText()))

    def enterDissectCommand(self, ctx):  # noqa: N802
        self.dissect_patterns.append(ctx.string().getText())


def _unquote(name: str) -> str:
    return name.replace("`", "")


def field_references(query: str) -> list[str]:
    """Names the query reads that it did not create itself: its references to source fields.

    A name counts as created once an EVAL/STATS/BY assignment or a DISSECT pattern defines it;
    uses before that point are rare in our queries and would be reported (which is the safe side).
    """
    tree, _ = parse(query)
    names = _Names()
    ParseTreeWalker().walk(names, tree)
    created = set(names.assigned)
    for pattern in names.dissect_patterns:
        created.update(re.findall(r"%\{([^}]+)\}", pattern))
    seen: list[str] = []
    for n in names.qualified:
        if n not in created and n not in seen:
            seen.append(n)
    return seen
