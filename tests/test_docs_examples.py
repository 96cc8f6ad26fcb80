"""The examples a user copies from README.md and docs/*.md: each is taken out of the markdown and fed
to the code that reads it, so a doc example that stopped loading (a renamed setting, option or
message field) fails here rather than for the user who followed it."""
from __future__ import annotations

import functools
import json
import logging
import re
import shlex
from pathlib import Path

import click
import pytest

from conftest import ADMIN_KEY, T0

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


# -- README's minimal openai.yml --------------------------------------------------------------------
def test_the_readme_s_minimal_config_loads_as_it_says(tmp_path):
    from agent_input.config import load_config

    text = (ROOT / "README.md").read_text()
    m = re.search(r"A minimal `openai.yml`:\s*```yaml\n(.*?)```", text, re.S)
    assert m, "README.md lost its minimal openai.yml"
    path = tmp_path / "openai.yml"
    path.write_text(m.group(1))
    config = load_config(path, env={"OPENAI_ADMIN_KEY": ADMIN_KEY})  # "or the OPENAI_ADMIN_KEY environment variable"
    assert config.url.rstrip("/") == "https://api.openai.com"  # "# default"
    enabled = {s.name for s in config.enabled_streams()}
    assert "audit" not in enabled and "completions" in enabled
    assert config.stream("completions").finalization_grace == 0


# -- every command line the docs show ----------------------------------------------------------------
def _documented_commands() -> list[tuple[str, str, str]]:
    """(doc, program, arguments) of each whole command in a shell or ini block."""
    found = []
    for path in DOCS:
        for block in _blocks(path, "sh") + _blocks(path, "ini"):
            for line in block.replace("\\\n", " ").splitlines():
                m = re.search(r"(?:^|\s|/)(openai-(?:input|assets)) ((?:collect|check|run|demo|simulate|install|"
                              r"export|validate|uninstall)\b.*)", line.split(" #")[0])
                if m:
                    found.append((path.name, m.group(1), m.group(2)))
    for path in (ROOT / "docs" / "protocol.md",):  # the synopsis of `run`
        for block in _blocks(path, ""):
            m = re.match(r"(openai-input) (run .*)", block.strip())
            if m:
                found.append((path.name, m.group(1), m.group(2)))
    return found


def test_the_docs_show_the_commands_this_test_parses():
    shown = {(prog, args.split()[0]) for _, prog, args in _documented_commands()}
    assert {("openai-input", "collect"), ("openai-input", "check"), ("openai-input", "run"),
            ("openai-assets", "install"), ("openai-assets", "export"), ("openai-assets", "validate"),
            ("openai-assets", "uninstall")} <= shown


@pytest.mark.parametrize("doc,prog,args", _documented_commands(),
                         ids=[f"{d}:{p} {a.split()[0]}" for d, p, a in _documented_commands()])
def test_each_documented_command_line_parses(doc, prog, args):
    """Every option is spelled as the program spells it and takes the value shown; `[...]` marks
    an optional part, `…` a value left out."""
    from agent_input.cli import main as openai_input
    from kibana_assets.cli import main as openai_assets

    argv = [a.strip("[]") for a in shlex.split(args.replace("…", "x"))]
    group = {"openai-input": openai_input, "openai-assets": openai_assets}[prog]
    command = group.get_command(click.Context(group), argv[0])
    assert command is not None, f"{doc}: {prog} has no command {argv[0]}"
    try:
        command.make_context(argv[0], argv[1:], parent=click.Context(group, info_name=prog))
    except click.UsageError as exc:
        pytest.fail(f"{doc}: `{prog} {args}`: {exc.format_message()}")


# -- docs/protocol.md's messages ---------------------------------------------------------------------
def _protocol_lines() -> list[dict]:
    lines = []
    for block in _blocks(ROOT / "docs" / "protocol.md", "json"):
        # a message may be wrapped over lines in the doc (one object per message, never split apart)
        for part in re.split(r"\n(?=\{)", block.strip()):
            lines.append(part.replace("\n", " "))
    return lines


def _example(kind: str) -> list[str]:
    """The doc's example lines of one message type (the `...` of an elided value kept)."""
    return [line for line in _protocol_lines() if f'"type": "{kind}"' in line]


def test_the_protocol_config_example_is_a_valid_config_as_written():
    from agent_input.config import config_from_dict

    (line,) = _example("config")
    msg = json.loads(line)
    config = config_from_dict(msg["config"], env={})
    enabled = {s.name for s in config.enabled_streams()}
    assert "completions" in enabled and "audit" not in enabled
    assert config.stream("completions").interval == 300
    assert config.namespace == "default"


def test_the_protocol_examples_are_accepted_and_what_comes_out_has_the_documented_fields(simulator, tmp_path, caplog):
    """The config, ack and stop lines of docs/protocol.md, sent to `run` as written (the config
    pointed at the simulator): none is reported malformed, the config runs, the stop stops; the
    event and status lines that come out carry the fields the doc's examples and table show."""
    from protocol_supervisor import InProcess

    (config_line,) = _example("config")
    config = json.loads(config_line)
    config["config"].update(url=simulator.base_url, api_key=ADMIN_KEY)
    run = InProcess(tmp_path / "state", tmp_path / "stdout", clock=lambda: T0, ack_timeout=0.1).start()
    with caplog.at_level(logging.WARNING, logger="agent_input.protocol"):
        run.send(json.dumps(config).encode())
        run.wait_for(lambda: any(m.get("status") == "healthy" for m in run.statuses("input")), what="healthy")
        run.wait_for(lambda: any(m["type"] == "event" for m in run.messages()), what="an event")
        for line in _example("ack"):
            run.send(line.encode())
        (stop,) = _example("stop")
        run.send(stop.encode())
        assert run.stop() == 0
        run.close()
    malformed = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert malformed == [], malformed  # (an ack of a batch not awaited is "ignored", not malformed)
    messages = run.messages()
    assert run.statuses("input")[-1]["status"] == "stopped"

    # the example elides the document's content (`{...}`, `, ...`)
    (doc_event,) = [json.loads(re.sub(r",\s*\.\.\.\}", "}", line.replace("{...}", "{}"))) for line in _example("event")]
    event = next(m for m in messages if m["type"] == "event")
    assert set(event) == set(doc_event)
    text = (ROOT / "docs" / "protocol.md").read_text()
    table = re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", text, re.M)
    assert {f for row in table for f in row if f} == set(event) - {"type"}
    assert event["index"] == f"logs-{event['dataset']}-default" and event["dataset"] == f"openai.{event['stream']}"
    assert "_id" not in event["document"]

    for doc_status in (json.loads(line) for line in _example("status")):
        shown = next(m for m in messages if m["type"] == "status" and m["scope"] == doc_status["scope"]
                     and m["status"] == "healthy")
        assert set(shown) == set(doc_status), (doc_status, shown)
    healthy = next(m for m in run.statuses("input") if m["status"] == "healthy")
    assert healthy["config_id"] == config["id"] and healthy["message"].startswith("running revision 1 (completions")


# -- and the other way: what the programs take is in the docs ----------------------------------------
def _docs_text() -> str:
    return "\n".join(path.read_text() for path in DOCS)


def test_every_option_of_every_command_is_documented():
    """A user learns an option from the docs, not by reading `--help` of every command: each one
    (but --help) is named in README.md or docs/*.md."""
    from agent_input.cli import main as openai_input
    from kibana_assets.cli import main as openai_assets

    text = _docs_text()
    missing = [f"{prog} {name} {opt}"
               for prog, group in (("openai-input", openai_input), ("openai-assets", openai_assets))
               for name, command in group.commands.items()
               for param in command.params if isinstance(param, click.Option) and not param.hidden
               for opt in param.opts if opt.startswith("--") and opt != "--help" and opt not in text]
    assert missing == []


def test_every_manifest_var_is_documented():
    """README.md says each variable is declared in manifest.yml; each is also named in the docs
    (`name`, or a `name:` line of an example config), so what it does is found there."""
    from agent_input import config as C

    text = _docs_text()
    names = set(C.global_vars()) | {v for stream in C.data_streams() for v in C._stream_vars(stream)}
    missing = sorted(n for n in names if not re.search(rf"`{n}[`:]|^\s*#?\s*{n}:", text, re.M))
    assert missing == []


# -- the code the docs name --------------------------------------------------------------------------
# What a doc names in backticks as code: a module (`agent_input/engine.py`, `cli.py`), `module.Name`
# and `module.Name.attr` (`paging.PageFetcher`, `engine.SWITCH_INTERVAL`), `Class.member`
# (`UsageCollector._emit_bucket`, the class defined once in the project, or every class of that name
# searched), keywords of a call shown (`UsageCollector(names=...)`), and a bare `ClassName`,
# `CONSTANT` or `_member`. Each must still be there: a renamed or removed one sends a reader of the
# docs to code that does not exist.
PACKAGES = ("agent_input", "kibana_assets")
# Backticked names that are deliberately not code of this project (each with why); dotted tokens whose
# first word is no module or class of the project (`openai.base.revision`, `requests.Session`) are
# never taken for code, so only the clashes are here.
NOT_CODE = {
    "ecs.version": "an ECS field (`ecs` is also a module's name)",
    "Date": "OpenAI's HTTP response header",
    "GET": "an HTTP method", "PUT": "an HTTP method",
    "LIMIT": "the ES|QL command",
    "AuditLog": "a schema of OpenAI's API reference", "AuditLogEventType": "a schema of OpenAI's API reference",
    "UTC": "a value of Kibana's dateFormat:tz", "Browser": "a value of Kibana's dateFormat:tz",
    "PATH": "README's placeholder for the output file's path",
    "STATE": "docs/protocol.md's placeholder for the supervisor's acknowledged state",
    "TMPDIR": "an environment variable Python's tempfile reads",
    "HTTP_PROXY": "an environment variable requests reads", "HTTPS_PROXY": "an environment variable requests reads",
    "NO_PROXY": "an environment variable requests reads",
    "REQUESTS_CA_BUNDLE": "an environment variable requests reads",
    "_id": "an Elasticsearch metadata field", "_source": "an Elasticsearch metadata field",
    "_meta": "an Elasticsearch mapping's metadata",
    "_rollover": "an Elasticsearch API", "_import": "a Kibana API", "_export": "a Kibana API",
}
# where a file named by itself is looked for (`state.py`, `_usage.yml`, `manifest.yml`)
FILE_HOMES = ("", "agent_input", "agent_input/simulator", "kibana_assets", "kibana_assets/fields", "benchmarks",
              "scripts", "tests")
UNITS = {"": 1, "s": 1, "second": 1, "seconds": 1, "minute": 60, "minutes": 60, "hour": 3600, "hours": 3600,
         "day": 86400, "days": 86400, "KiB": 1024, "MiB": 1 << 20}


def _project_modules() -> dict[str, list]:
    """Each module by its dotted name and by its last part (`cli` is two modules)."""
    import importlib
    import pkgutil

    modules: dict[str, list] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for name in [package] + [i.name for i in pkgutil.walk_packages(root.__path__, package + ".")]:
            module = importlib.import_module(name)
            for key in {name, name.rsplit(".", 1)[-1]}:
                modules.setdefault(key, []).append(module)
    return modules


def _project_classes(modules: dict[str, list]) -> dict[str, list[type]]:
    import inspect

    classes: dict[str, list[type]] = {}
    for module in {id(m): m for ms in modules.values() for m in ms}.values():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                classes.setdefault(name, []).append(obj)
    return classes


@functools.lru_cache(maxsize=None)
def _members(cls: type) -> frozenset[str]:
    """A class's attributes, its dataclass fields and what its methods assign to `self.<name>`."""
    import ast
    import inspect
    import textwrap

    names = set(dir(cls))
    for klass in cls.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
        if klass.__module__.split(".")[0] in PACKAGES:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
            names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name) and n.value.id == "self" and isinstance(n.ctx, ast.Store)}
    return frozenset(names)


def _source_names() -> tuple[set[str], set[str]]:
    """Top-level names of the scripts the docs name (benchmarks/, scripts/, tests/), and every string
    literal of the project's code (an environment variable it reads, `ES_URL`)."""
    import ast

    top, strings = set(), set()
    for path in [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py")]:
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            top |= {t.id for t in targets if isinstance(t, ast.Name)}
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                top.add(node.name)
    for package in (*PACKAGES, "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            strings |= {n.value for n in ast.walk(ast.parse(path.read_text()))
                        if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return top, strings


def _code_spans() -> list[tuple[str, int, str, str]]:
    """(doc, line, the backticked text, the text right after it) of every inline code span."""
    spans = []
    for path in DOCS:
        text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.S)
        for m in re.finditer(r"`([^`\n]+)`(?=([^`]{0,40}))", text):
            after = re.sub(r"\s+", " ", m.group(2))
            spans.append((path.name, text.count("\n", 0, m.start()) + 1, m.group(1), after))
    return spans


def _resolve(parts: list[str], modules, classes):
    """What `a.b.c` names: the object, or `None` if its first word is no module or class of the
    project (not code); raises LookupError with what is missing when it names code that is not there."""
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in modules:
            candidates, rest = modules[head], parts[n:]
            break
    else:
        if parts[0] not in classes:
            return None
        candidates, rest = classes[parts[0]], parts[1:]
    for part in rest:
        found = []
        for obj in candidates:
            if isinstance(obj, type) and part in _members(obj):
                found.append(getattr(obj, part, obj))  # an instance attribute: its class stands in
            elif not isinstance(obj, type) and hasattr(obj, part):
                found.append(getattr(obj, part))
        if not found:
            raise LookupError(f"{'.'.join(parts)}: no {part!r} in {', '.join(getattr(c, '__name__', repr(c)) for c in candidates)}")
        candidates = found
    return candidates[0]


def _code_reference_problems() -> list[str]:
    import inspect

    modules = _project_modules()
    classes = _project_classes(modules)
    top, strings = _source_names()
    everywhere = {name for ms in modules.values() for m in ms for name in vars(m)}
    everywhere |= {name for cs in classes.values() for c in cs for name in _members(c)}
    problems, checked, values = [], 0, 0
    for doc, line, span, after in _code_spans():
        where = f"{doc}:{line}: `{span}`"
        if span in NOT_CODE:
            continue
        # a path of the repository (`agent_input/engine.py`, `python benchmarks/run.py --org large`)
        for path in re.findall(r"(?<![\w/.])((?:agent_input|kibana_assets|benchmarks|tests|scripts|docs|simulator)/[\w./<>-]*)", span):
            path = re.sub(r"<[^>]*>", "*", path)
            base = ROOT / "agent_input" if path.startswith("simulator/") else ROOT
            checked += 1
            if not list(base.glob(path.rstrip("/"))):
                problems.append(f"{where}: no file {path}")
        # a file of the project named by itself (`state.py`, `manifest.yml`, `_usage.yml`)
        # (not `openai.yml`, `kibana.yml`: a user's files)
        if re.fullmatch(r"[\w-]+\.py|_\w+\.yml|setup\.py|pyproject\.toml|manifest\.yml|MANIFEST\.in", span):
            checked += 1
            if not any((ROOT / home / span).exists() for home in FILE_HOMES):
                problems.append(f"{where}: no such file in the project")
            continue
        if re.fullmatch(r"[\w-]+\.(yml|json|ndjson|toml|in)", span):
            continue
        # `module.Name`, `Class.member`, a call shown with its keywords
        m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\((.*)\))?", span)
        if not m:
            continue
        name, call, args = m.group(1), m.group(2), m.group(3) or ""
        parts = name.split(".")
        if len(parts) > 1 or call and parts[0] in classes:
            try:
                obj = _resolve(parts, modules, classes)
            except LookupError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if obj is None:
                continue
            checked += 1
            keywords = re.findall(r"(\w+)=", args)
            if keywords and callable(obj):
                params = inspect.signature(obj).parameters
                problems += [f"{where}: {obj.__qualname__} takes no {k}=" for k in keywords if k not in params]
        elif not call and re.fullmatch(r"[A-Z]\w*[a-z]\w*|[A-Z][A-Z0-9]*(_[A-Z0-9]+)+|[A-Z]{2,}|_[a-z]\w*", name):
            checked += 1
            if name not in everywhere and name not in top and name not in strings:
                problems.append(f"{where}: no {name} in the project's code")
                continue
            defined = {id(vars(m)[name]): vars(m)[name] for ms in modules.values() for m in ms if name in vars(m)}
            if len(defined) != 1:
                continue
            (obj,) = defined.values()
        else:
            continue
        # a value stated with a constant: "`PAGES_AHEAD` (4)", "`EARLY_REFRESH_AFTER` = 5 minutes"
        v = re.match(r" (?:\(|= )(\d[\d,]*(?:\.\d+)?)(?: ([A-Za-z]+))?", after)
        if v and parts[-1].isupper() and v.group(2) in (None, *UNITS):
            stated = float(v.group(1).replace(",", "")) * UNITS[v.group(2) or ""]
            values += 1
            if obj != stated:
                problems.append(f"{where}: the doc says {' '.join(filter(None, v.groups()))}, the code {obj!r}")
    assert checked > 150 and values >= 5, f"{checked} references, {values} values checked: the extraction lost track of the docs"
    return problems


def test_every_code_name_in_the_docs_is_in_the_code():
    assert _code_reference_problems() == []
