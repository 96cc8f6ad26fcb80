"""Offline ES|QL checks: parse with the official grammar (PyPI `esql-parser`, generated from
Elasticsearch's ANTLR grammar) and list the source fields a query references.

`esql-parser` is a test/validate dependency; importing this module without it raises ImportError.
"""
from __future__ import annotations

import fnmatch
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
    """Walks a query in order: a name is a reference to a source field unless a command before it
    created a column of that name (EVAL/STATS/BY assignments, the columns an unassigned aggregate or
    group is named after, RENAME's new name, DISSECT's and GROK's keys)."""

    def __init__(self) -> None:
        self.refs: list[str] = []
        self.created: set[str] = set()

    def _read(self, name: str) -> None:
        if name not in self.created and name not in self.refs:
            self.refs.append(name)

    def enterQualifiedName(self, ctx):  # noqa: N802
        parent = ctx.parentCtx
        if isinstance(parent, EsqlBaseParser.FieldContext) and parent.ASSIGN() is not None \
                and parent.qualifiedName() is ctx:
            return  # the column an assignment creates, not a read
        self._read(_unquote(ctx.getText()))

    def exitField(self, ctx):  # noqa: N802
        # after its expression: `x = x + 1` reads the source's x. An unassigned field (`SUM(a)`,
        # `BY a`) is a column named after its text, as written.
        if ctx.qualifiedName() is not None and ctx.ASSIGN() is not None:
            self.created.add(_unquote(ctx.qualifiedName().getText()))
        else:
            self.created.update({_unquote(ctx.getText()), _source_text(ctx)})

    def enterRenameClause(self, ctx):  # noqa: N802
        old, new = _unquote(ctx.oldName.getText()), _unquote(ctx.newName.getText())
        if "*" not in old:
            self._read(old)
        self.created.add(new)

    def exitDissectCommand(self, ctx):  # noqa: N802
        for key in re.findall(r"%\{([^}]*)\}", ctx.string().getText()):
            self.created.add(key.removesuffix("->").lstrip("+?*&").split("/")[0])

    def exitGrokCommand(self, ctx):  # noqa: N802
        self.created.update(re.findall(r"%\{[^}:]+:([^}:]+)[^}]*\}", ctx.string().getText()))


def _source_text(ctx) -> str:
    return _unquote(ctx.start.getInputStream().getText(ctx.start.start, ctx.stop.stop))


def _unquote(name: str) -> str:
    return name.replace("`", "")


def field_references(query: str) -> list[str]:
    """Names the query reads that it did not create itself: its references to source fields.

    A name counts as created from the command that creates it on (an EVAL/STATS/BY assignment, an
    unassigned aggregate's or group's column, RENAME's new name, a DISSECT or GROK key); a use
    before that point, or RENAME's old name, is a reference.
    """
    tree, _ = parse(query)
    names = _Names()
    ParseTreeWalker().walk(names, tree)
    return names.refs


class _Columns(EsqlBaseParserListener):
    """Follows the column list through the processing commands, in order (the parse tree's
    pre-order walk meets them in query order). None: still the source's columns."""

    def __init__(self) -> None:
        self.cols: list[str] | None = None

    @staticmethod
    def _name(field) -> str:
        if field.qualifiedName() is not None and field.ASSIGN() is not None:
            return _unquote(field.qualifiedName().getText())
        return _unquote(field.getText())  # ES|QL names an unassigned column after its expression

    def _matching(self, patterns) -> list[str]:
        return [c for c in self.cols or [] if any(fnmatch.fnmatchcase(c, p) for p in patterns)]

    @staticmethod
    def _patterns(ctx) -> list[str]:
        return [_unquote(p.getText()) for p in ctx.qualifiedNamePatterns().qualifiedNamePattern()]

    def enterStatsCommand(self, ctx):  # noqa: N802
        aggs = [self._name(a.field()) for a in ctx.aggFields().aggField()] if ctx.aggFields() else []
        groups = [self._name(f) for f in ctx.fields().field()] if ctx.fields() else []
        self.cols = aggs + groups

    def _add(self, names: list[str]) -> None:
        if self.cols is not None:  # a column assigned again moves to the end
            self.cols = [c for c in self.cols if c not in names] + names

    def enterEvalCommand(self, ctx):  # noqa: N802
        self._add([self._name(f) for f in ctx.fields().field()])

    def enterDissectCommand(self, ctx):  # noqa: N802
        # Dissect's key modifiers: `?name` and `%{}` are skipped, `+name[/n]` appends to `name`,
        # `name->` pads; `*key`/`&key` name a column after the text, unknown until the query runs.
        names: list[str] = []
        for key in re.findall(r"%\{([^}]*)\}", ctx.string().getText()):
            key = key.removesuffix("->")
            if key[:1] in ("*", "&"):
                self.cols = None
                return
            if not key or key.startswith("?"):
                continue
            name = key.removeprefix("+").split("/")[0]
            if name not in names:
                names.append(name)
        self._add(names)

    def enterGrokCommand(self, ctx):  # noqa: N802
        self._add(re.findall(r"%\{[^}:]+:([^}:]+)[^}]*\}", ctx.string().getText()))

    def enterKeepCommand(self, ctx):  # noqa: N802
        patterns = self._patterns(ctx)
        if self.cols is None:
            self.cols = [p for p in patterns if "*" not in p] if all("*" not in p for p in patterns) else None
            return
        kept: list[str] = []
        for p in patterns:
            kept += [c for c in self.cols if fnmatch.fnmatchcase(c, p) and c not in kept]
        self.cols = kept

    def enterDropCommand(self, ctx):  # noqa: N802
        if self.cols is not None:
            dropped = set(self._matching(self._patterns(ctx)))
            self.cols = [c for c in self.cols if c not in dropped]

    def enterRenameClause(self, ctx):  # noqa: N802
        names = [_unquote(p.getText()) for p in ctx.qualifiedNamePattern()]
        old, new = (names[1], names[0]) if ctx.ASSIGN() is not None else (names[0], names[1])
        if self.cols is not None:
            self.cols = [new if c == old else c for c in self.cols if c != new or c == old]


def output_columns(query: str) -> list[str] | None:
    """The columns a query returns, in order, once a STATS or KEEP has fixed them (None while they
    are the source index's, or once a DISSECT names columns after the data): what a Lens ES|QL
    panel's declared columns must be found in."""
    tree, _ = parse(query)
    columns = _Columns()
    ParseTreeWalker().walk(columns, tree)
    return columns.cols
