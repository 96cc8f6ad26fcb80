"""The examples a user copies from README.md and docs/*.md: each is taken out of the markdown and fed
to the code that reads it, so a doc example that stopped loading (a renamed setting, option or
message field) fails here rather than for the user who followed it."""
from __future__ import annotations

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
