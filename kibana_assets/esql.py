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


class _Opaque(Exception):
    """A command adds columns named by the data or by another index: the walk stops there."""


def name_matches(name: str, pattern: str) -> bool:
    """ES|QL's name patterns: `*` matches any run of characters, nothing else is special."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), name) is not None


class _Columns(EsqlBaseParserListener):
    """Follows the columns through the commands in query order (the parse tree's pre-order walk
    meets them so) and checks each name a command reads against the columns there.

    `cols` lists the columns the commands made (EVAL, STATS, RENAME, DISSECT, GROK, ...), in order.
    While `source`, the source index's fields are columns too, less those a DROP, RENAME or
    wildcard KEEP took out (`filters`); a STATS, or a KEEP of plain names, ends that: from then on
    `cols` is every column. A name read that is not in `cols` is a source field while `source`
    (`refs`: validate looks them up in the mappings), else no column at all (`missing`, with the
    command after which it is read: ES|QL fails, "Unknown column"). KEEP and DROP read their
    patterns: each must match a column. After a command whose columns come from the data or
    another index (DISSECT `%{*k}`, ENRICH without WITH, LOOKUP JOIN, FORK, ...) nothing is checked.
    """

    def __init__(self) -> None:
        self.cols: list[str] = []
        self.source = True
        self.filters: list[tuple[bool, list[str]]] = []  # (KEEP?, patterns) applied to the source
        self.refs: list[str] = []
        self.missing: list[tuple[str, str]] = []
        self.last = "FROM"
        self.stopped = False

    def _read(self, name: str) -> bool:
        """Checks a name (or KEEP/DROP pattern) read here; True if it is one of the source's fields."""
        if name in self.cols:
            return False
        if self.source and all(any(name_matches(name, p) for p in pats) == keep for keep, pats in self.filters):
            if name not in self.refs:
                self.refs.append(name)
            return True
        if (name, self.last) not in self.missing:
            self.missing.append((name, self.last))
        return False

    def _add(self, names: list[str]) -> None:
        for name in names:  # a column assigned again moves to the end
            self.cols = [c for c in self.cols if c != name] + [name]

    def _stop(self, ctx=None) -> None:
        self.stopped = True
        raise _Opaque

    def enterQualifiedName(self, ctx):  # noqa: N802
        parent = ctx.parentCtx
        if isinstance(parent, EsqlBaseParser.FieldContext) and parent.qualifiedName() is ctx \
                or any(ctx is getattr(parent, a, None) for a in ("targetType", "targetPvalue", "targetField")):
            return  # the column an assignment, CHANGE_POINT's AS or COMPLETION creates, not a read
        self._read(_unquote(ctx.getText()))

    # commands that create columns, after reading their input (`EVAL x = x + 1` reads the source's x)
    def enterRowCommand(self, ctx):  # noqa: N802
        self.source, self.last = False, "ROW"

    def enterMetadata(self, ctx):  # noqa: N802
        self._add([t.getText() for t in ctx.UNQUOTED_SOURCE()])

    def exitField(self, ctx):  # noqa: N802
        if isinstance(ctx.parentCtx.parentCtx, (EsqlBaseParser.EvalCommandContext, EsqlBaseParser.RowCommandContext)):
            self._add([_column(ctx)])  # one by one: `EVAL a = 1, b = a + 1` reads the a just made

    def exitStatsCommand(self, ctx):  # noqa: N802
        """Only its aggregates and groups are columns after a STATS."""
        self.cols, self.source, self.filters, self.last = [], False, [], "STATS"
        self._add(_stats_columns(ctx))

    def exitInlinestatsCommand(self, ctx):  # noqa: N802
        self._add(_stats_columns(ctx))

    def exitDissectCommand(self, ctx):  # noqa: N802
        # Dissect's key modifiers: `?name` and `%{}` are skipped, `+name[/n]` appends to `name`,
        # `name->` pads; `*key`/`&key` name a column after the text, unknown until the query runs.
        names: list[str] = []
        for key in re.findall(r"%\{([^}]*)\}", ctx.string().getText()):
            key = key.removesuffix("->")
            if key[:1] in ("*", "&"):
                self._stop()
            if key and not key.startswith("?"):
                names.append(key.removeprefix("+").split("/")[0])
        self._add(list(dict.fromkeys(names)))

    def exitGrokCommand(self, ctx):  # noqa: N802
        pattern = ctx.string().getText()  # %{SYNTAX:name[:type]} and Oniguruma's (?<name>...)
        self._add(re.findall(r"%\{[^}:]+:([^}:]+)[^}]*\}", pattern) + re.findall(r"\(\?<([^>]+)>", pattern))

    def exitChangePointCommand(self, ctx):  # noqa: N802
        self._add([_unquote(t.getText()) if t else d for t, d in ((ctx.targetType, "type"), (ctx.targetPvalue, "pvalue"))])

    def exitCompletionCommand(self, ctx):  # noqa: N802
        self._add([_unquote(ctx.targetField.getText()) if ctx.targetField else "completion"])

    def enterEnrichCommand(self, ctx):  # noqa: N802
        if ctx.matchField is not None:
            self._read(_unquote(ctx.matchField.getText()))

    def exitEnrichCommand(self, ctx):  # noqa: N802
        if not ctx.enrichWithClause():
            self._stop()  # every enrich field of the policy, which only the cluster knows
        self._add([_unquote((w.newName or w.enrichField).getText()) for w in ctx.enrichWithClause()])

    exitJoinCommand = _stop  # the lookup index's fields, after its ON reads the join key
    enterForkCommand = enterRerankCommand = enterRrfCommand = enterLookupCommand = enterInsistCommand = _stop

    # commands that take columns away
    def _matches(self, pattern: str) -> list[str]:
        """The columns a KEEP or DROP pattern names (a plain name can be a source field's)."""
        hits = [c for c in self.cols if name_matches(c, pattern)]
        if not hits and self._read(pattern) and "*" not in pattern:
            hits = [pattern]
        return hits

    def enterKeepCommand(self, ctx):  # noqa: N802
        # A column matching several patterns is placed by the one that wins: a plain name over a
        # partial wildcard over `*`, and the rightmost of equals.
        patterns = _patterns(ctx)
        rank: dict[str, tuple[int, int]] = {}
        for i, p in enumerate(patterns):
            for c in self._matches(p):
                rank[c] = max(rank.get(c, (0, 0)), (2 if "*" not in p else 0 if p == "*" else 1, i))
        self.cols, self.last = sorted(rank, key=lambda c: rank[c][1]), "KEEP"
        if any("*" in p for p in patterns) and self.source:
            self.filters.append((True, patterns))
        else:
            self.source, self.filters = False, []

    def enterDropCommand(self, ctx):  # noqa: N802
        patterns = _patterns(ctx)
        dropped = {c for p in patterns for c in self._matches(p)}
        self.cols, self.last = [c for c in self.cols if c not in dropped], "DROP"
        self.filters.append((False, patterns))

    def enterRenameClause(self, ctx):  # noqa: N802
        old, new = _unquote(ctx.oldName.getText()), _unquote(ctx.newName.getText())
        self._read(old)
        self.cols = [new if c == old else c for c in self.cols if c != new]
        self._add([] if new in self.cols else [new])
        self.filters.append((False, [old]))
        self.last = "RENAME"


def _column(field) -> str:
    """The column a field (`EVAL`/`STATS`/`BY`) makes: its assigned name, or its text as written."""
    if field.qualifiedName() is not None:
        return _unquote(field.qualifiedName().getText())
    return _unquote(field.start.getInputStream().getText(field.start.start, field.stop.stop))


def _stats_columns(ctx) -> list[str]:
    aggs = [a.field() for a in ctx.aggFields().aggField()] if ctx.aggFields() else []
    return [_column(f) for f in aggs + (list(ctx.fields().field()) if ctx.fields() else [])]


def _patterns(ctx) -> list[str]:
    return [_unquote(p.getText()) for p in ctx.qualifiedNamePatterns().qualifiedNamePattern()]


def _unquote(name: str) -> str:
    return name.replace("`", "")


def columns(query: str) -> _Columns:
    """Walks a query (raises EsqlSyntaxError): its `refs` to source fields, in order, the names
    it reads where no column has them (`missing`, with the command before), and its columns."""
    tree, _ = parse(query)
    walk = _Columns()
    try:
        ParseTreeWalker().walk(walk, tree)
    except _Opaque:
        pass
    return walk


def field_references(query: str) -> list[str]:
    """Names (and KEEP/DROP patterns) the query reads as source fields: read while the source
    index's fields are columns, and not made by a command before (an EVAL/STATS/BY assignment, an
    unassigned aggregate's or group's column, RENAME's new name, a DISSECT or GROK key)."""
    return columns(query).refs


def output_columns(query: str) -> list[str] | None:
    """The columns a query returns, in order, once a STATS or KEEP has fixed them (None while they
    are the source index's, or once a DISSECT names columns after the data): what a Lens ES|QL
    panel's declared columns must be found in."""
    walk = columns(query)
    return None if walk.source or walk.stopped else walk.cols
