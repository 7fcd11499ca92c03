"""The docs agree with the code: every command, flag, variable, port, name and kind they mention.

Docs drift silently (a renamed flag, a port changed in one place): these checks make the next
drift fail CI. Each checker is a pure function of a document's text and of `Truth`, the facts
read from the code, so that a planted inconsistency is one call (see the tests at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hcl2
import pytest
from hcl2.utils import SerializationOptions

from bridge import cli, config, demo, events, hooks

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [
        REPO / "README.md",
        REPO / "terraform" / "README.md",
        *(REPO / "docs").glob("*.md"),
        *(REPO / "examples" / "consumers").glob("*/README.md"),
    ]
)

# Flags of other tools (docker, podman, gcloud, functions-framework, bench/run.py) that the prose
# names on their own.
FOREIGN_FLAGS = frozenset(
    [
        "--env-file",
        "--format",
        "--instance-termination-action",
        "--network",
        "--no-healthcheck",
        "--quick",
        "--signature-type",
    ]
)
SHELL_SEPARATORS = re.compile(r"\|\||&&|[|;]|\s&\s")


@dataclass(frozen=True)
class Truth:
    """What the code says: the facts every document is checked against."""

    commands: dict[str, frozenset[str]]  # subcommand -> its flags; "" -> the top level's
    env_vars: frozenset[str]
    metrics_port: int
    simulator_port: int
    variables: frozenset[str]
    attributes: dict[str, frozenset[str]]  # object-typed variable -> its attributes
    outputs: frozenset[str]
    topic_name: str
    demo_topic: str
    kinds: tuple[str, ...]
    upcoming_fields: frozenset[str]  # `upcoming.type` names a data field, not a kind
    modules: frozenset[str]
    hook_filter: str  # the placeholder of `--exec`'s filter syntax, as the code's help says it

    @property
    def all_flags(self) -> frozenset[str]:
        return frozenset().union(*self.commands.values())


def _subparsers(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def _flags(parser: argparse.ArgumentParser) -> frozenset[str]:
    return frozenset(s for a in parser._actions for s in a.option_strings if s.startswith("--"))


def _tf_blocks(kind: str) -> frozenset[str]:
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
    names: set[str] = set()
    for path in (REPO / "terraform").glob("*.tf"):
        with path.open() as f:
            for block in hcl2.load(f, serialization_options=options).get(kind, []):
                names.update(block)
    return frozenset(names)


def _object_attributes(type_expr: str) -> frozenset[str]:
    """Top-level attribute names of an `object({...})` type expression."""
    names: set[str] = set()
    depth = 0
    for m in re.finditer(
        r"[({\[]|[)}\]]|\b(\w+)\s*=(?!=)",
        type_expr[type_expr.index("object({") + len("object({") :],
    ):
        if m.group(1):
            names.update([m.group(1)] if depth == 0 else [])
        elif m.group(0) in "({[":
            depth += 1
        elif depth == 0:
            break
        else:
            depth -= 1
    return frozenset(names)


def _variable_attributes() -> dict[str, frozenset[str]]:
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
    found = {}
    for path in (REPO / "terraform").glob("*.tf"):
        with path.open() as f:
            for block in hcl2.load(f, serialization_options=options).get("variable", []):
                for name, body in block.items():
                    if str(body.get("type", "")).startswith("${object("):
                        found[name] = _object_attributes(str(body["type"]))
    return found


def _module_topic_name() -> str:
    """`coalesce(var.topic_name, "${var.name}<suffix>")` with the default of `name`."""
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
    with (REPO / "terraform" / "variables.tf").open() as f:
        variables = {
            k: v
            for b in hcl2.load(f, serialization_options=options)["variable"]
            for k, v in b.items()
        }
    locals_tf = (REPO / "terraform" / "locals.tf").read_text()
    match = re.search(
        r'topic_name\s*=\s*coalesce\(var\.topic_name, "\$\{var\.name\}([^"]*)"\)', locals_tf
    )
    assert match, "terraform/locals.tf no longer derives topic_name from var.name: update this test"
    return str(variables["name"]["default"]) + match.group(1)


def _test_knobs() -> frozenset[str]:
    """`BRIDGE_*` variables the tests and benchmarks read (docs/reliability.md cites them)."""
    read = re.compile(r"environ(?:\.get\(|\[)\s*\"(BRIDGE_[A-Z0-9_]+)\"")
    return frozenset(
        name
        for path in [*(REPO / "tests").rglob("*.py"), *(REPO / "bench").rglob("*.py")]
        if path.name != Path(__file__).name
        for name in read.findall(path.read_text())
    )


def _hook_variables() -> frozenset[str]:
    example = json.loads((REPO / "schemas" / "examples" / "maintenance.started.json").read_text())
    return frozenset(hooks.hook_environment(events.decode_structured(example), {}))


@functools.cache
def truth() -> Truth:
    top = cli.parser()
    subs = _subparsers(top)
    commands = {name: _flags(p) for name, p in subs.items()} | {"": _flags(top)}
    dockerfile = (REPO / "Dockerfile").read_text()
    port = re.search(r"BRIDGE_HTTP_PORT=(\d+)", dockerfile)
    assert port, "the Dockerfile no longer sets BRIDGE_HTTP_PORT"
    sim_port = next(a.default for a in subs["simulate"]._actions if "--port" in a.option_strings)
    exec_help = next(o.help for o in config.RUN_OPTIONS if o.name == "exec")
    hook_filter = re.search(r"\b([A-Z_]+)=CMD\b", exec_help)
    assert hook_filter, "the --exec help no longer names its filter syntax (PLACEHOLDER=CMD)"
    return Truth(
        commands=commands,
        env_vars=frozenset(o.env for o in config.RUN_OPTIONS) | _hook_variables() | _test_knobs(),
        metrics_port=int(port.group(1)),
        simulator_port=int(sim_port),
        variables=_tf_blocks("variable"),
        attributes=_variable_attributes(),
        outputs=_tf_blocks("output"),
        topic_name=_module_topic_name(),
        demo_topic=demo.DEMO_TOPIC.rsplit("/", 1)[1],
        kinds=events.KINDS,
        upcoming_fields=frozenset(f.name for f in dataclasses.fields(events.Upcoming)),
        modules=frozenset(p.stem for p in (REPO / "bridge").glob("*.py"))
        | {p.parent.name for p in (REPO / "bridge").glob("*/__init__.py")},  # packages
        hook_filter=hook_filter.group(1),
    )


# ---------------------------------------------------------------------------------------------
# Reading markdown: code blocks, inline code, command lines.

FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")


def _line(text: str, pos: int) -> str:
    return f"line {text.count(chr(10), 0, pos) + 1}"


def code_spans(text: str) -> Iterator[tuple[int, str]]:
    """(offset, text) of every code block line (continuations joined) and inline code span."""
    prose = text
    for block in FENCE.finditer(text):
        prose = prose[: block.start()] + " " * (block.end() - block.start()) + prose[block.end() :]
        offset = start = block.start(1)
        joined = ""
        for raw in block.group(1).splitlines(keepends=True):
            if not joined:
                start = offset
            joined += raw.rstrip("\n")
            offset += len(raw)
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            yield start, joined
            joined = ""
    for span in INLINE.finditer(prose):
        yield span.start(1), span.group(1).replace("\n", " ")


def bridge_commands(text: str) -> Iterator[tuple[int, list[str]]]:
    """Every `maintenance-bridge ...` command line: the words after the program's name.

    The program must be in command position (after `$`, `sudo`, `&`, variable assignments or a
    path), so that `systemctl restart maintenance-bridge` and image names are not commands.
    """
    for pos, line in code_spans(text):
        for segment in SHELL_SEPARATORS.split(line):
            words = segment.split()
            while words and (words[0] in ("$", "sudo", "&") or _assignment(words[0])):
                words.pop(0)
            if words and _is_program(words[0]):
                yield pos, words[1:]


def _assignment(word: str) -> bool:
    return re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word) is not None and not _is_program(word)


def _is_program(word: str) -> bool:
    path = word.split("=")[-1].strip("'\"")
    return re.split(r"[/\\]", path)[-1] in ("maintenance-bridge", "maintenance-bridge.exe")


def _flag(word: str) -> str | None:
    match = re.match(r"^\[?(--[a-z][a-z0-9-]*)", word)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# The checkers: text in, problems out.


def check_commands(text: str, t: Truth) -> list[str]:
    problems = []
    for pos, words in bridge_commands(text):
        if not words or words[0].startswith("#"):
            continue
        command = "" if words[0].startswith("-") else words[0]
        if command not in t.commands:
            problems.append(
                f"{_line(text, pos)}: `maintenance-bridge {command}`: no such subcommand"
            )
            continue
        for word in words if command == "" else words[1:]:
            if word.startswith("#"):
                break
            flag = _flag(word)
            if flag and flag not in t.commands[command]:
                name = f"maintenance-bridge {command}".strip()
                problems.append(f"{_line(text, pos)}: `{name}` has no flag {flag}")
    return problems


def check_flags(text: str, t: Truth) -> list[str]:
    """A flag named on its own (`--exec-timeout`) must be one of the CLI's."""
    problems = []
    for pos, span in code_spans(text):
        flag = _flag(span)
        if flag and flag not in t.all_flags and flag not in FOREIGN_FLAGS:
            problems.append(f"{_line(text, pos)}: {flag} is not a maintenance-bridge flag")
    return problems


def check_env_vars(text: str, t: Truth) -> list[str]:
    return [
        f"{_line(text, m.start())}: {m.group(0)} is neither a run option nor a hook variable"
        for m in re.finditer(r"\bBRIDGE_[A-Z][A-Z0-9_]*", text)
        if m.group(0) not in t.env_vars
    ]


def check_ports(text: str, t: Truth) -> list[str]:
    metrics = [
        r"--http-port[= ](\d+)",
        r"BRIDGE_HTTP_PORT\s*=\s*(\d+)",
        r"(?:127\.0\.0\.1|localhost):(\d+)/(?:healthz|readyz|metrics)",
    ]
    problems = []
    for pattern in metrics:
        for m in re.finditer(pattern, text):
            if int(m.group(1)) not in (0, t.metrics_port):
                problems.append(
                    f"{_line(text, m.start())}: port {m.group(1)} for the HTTP endpoint; "
                    f"the bridge's is {t.metrics_port}"
                )
    for m in re.finditer(r"(?<!-)\bport (\d{2,5})\b", text):  # prose, not another tool's --port
        if int(m.group(1)) not in (t.metrics_port, t.simulator_port):
            problems.append(
                f"{_line(text, m.start())}: port {m.group(1)} is neither the metrics port "
                f"({t.metrics_port}) nor the simulator's ({t.simulator_port})"
            )
    return problems


def check_terraform_names(text: str, t: Truth) -> list[str]:
    problems = [
        f"{_line(text, m.start())}: var.{m.group(1)} is not a variable of the module"
        for m in re.finditer(r"\bvar\.([a-z_][a-z0-9_]*)", text)
        if m.group(1) not in t.variables
    ]
    problems += [
        f"{_line(text, m.start())}: output {m.group(1)} does not exist"
        for m in re.finditer(r"terraform output (?:-raw |-json )?([a-z_][a-z0-9_]*)", text)
        if m.group(1) not in t.outputs
    ]
    for heading, declared in (("Inputs", t.variables), ("Outputs", t.outputs)):
        section = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        if not section:
            continue
        rows = set(re.findall(r"^\| `([a-z_][a-z0-9_]*)` \|", section.group(1), re.M))
        problems += [f"## {heading}: `{n}` is not in the module" for n in sorted(rows - declared)]
        problems += [f"## {heading}: `{n}` is not documented" for n in sorted(declared - rows)]
    inputs = re.search(r"^## Inputs\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    for row in re.finditer(
        r"^\| `([a-z_]+)` \| `object` \|(.*)$", inputs.group(1) if inputs else "", re.M
    ):
        name, description = row.groups()
        declared = t.attributes.get(name, frozenset())
        named = set(re.findall(r"`(\w+)` \(", description))  # `attr` (default)
        problems += [
            f"## Inputs: {name}.{a} is not in the module" for a in sorted(named - declared)
        ]
        mentioned = set(re.findall(r"`(\w+)`", description))
        problems += [
            f"## Inputs: {name}.{a} is not documented" for a in sorted(declared - mentioned)
        ]
    return problems


def check_topics(text: str, t: Truth) -> list[str]:
    """A concrete topic name is the module's (or the demo's); placeholders are upper case."""
    problems = []
    for m in re.finditer(r"(?:topics/|--topic[= ](?!projects/))([A-Za-z][\w.~+%-]*)", text):
        name = m.group(1)
        if re.fullmatch(r"[A-Z_]+", name) or name.startswith((t.topic_name, t.demo_topic)):
            continue
        problems.append(
            f"{_line(text, m.start())}: topic {name!r}; the module creates {t.topic_name!r}"
        )
    return problems


def check_kinds(text: str, t: Truth) -> list[str]:
    problems = [
        f"{_line(text, m.start())}: {m.group(0)} is not an event kind"
        for m in re.finditer(r"(?<![\w-])(?:maintenance|preemption|upcoming)\.[a-z_]+\b", text)
        if m.group(0) not in t.kinds and m.group(0).split(".")[1] not in t.upcoming_fields
    ]
    problems += [  # `bridge.X` is a kind (bridge.heartbeat) or a module/logger (bridge.relay)
        f"{_line(text, m.start())}: {m.group(0)} is neither an event kind nor a module"
        for m in re.finditer(r"(?<![\w-])bridge\.([a-z_]+)\b", text)
        if m.group(0) not in t.kinds and m.group(1) not in t.modules | {"log"}  # bridge.log: a file
    ]
    return problems


def check_hook_filter(text: str, t: Truth) -> list[str]:
    return [
        f"{_line(text, m.start())}: hook filter {m.group(0)}; the syntax is {t.hook_filter}=CMD"
        for m in re.finditer(r"\b([A-Z][A-Z_]*)=CMD\b", text)
        if m.group(1) != t.hook_filter
    ]


def check_log_queries(text: str, t: Truth) -> list[str]:
    """Loggers are `bridge`, `bridge.relay`, ...: equality on `bridge` misses its children."""
    return [
        f"{_line(text, m.start())}: {m.group(0)} misses the bridge.* loggers; "
        'use jsonPayload.logger=~"^bridge"'
        for m in re.finditer(r'jsonPayload\.logger\s*=\s*"bridge"', text)
    ]


CHECKS: tuple[Callable[[str, Truth], list[str]], ...] = (
    check_commands,
    check_flags,
    check_env_vars,
    check_ports,
    check_terraform_names,
    check_topics,
    check_kinds,
    check_hook_filter,
    check_log_queries,
)


def problems(text: str, t: Truth) -> list[str]:
    return [p for check in CHECKS for p in check(text, t)]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    without_code = FENCE.sub("", markdown)
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#{1,6} (.+)$", without_code, re.M)
    }


def broken_links(text: str, doc: Path) -> list[str]:
    """Relative links whose file, or whose #anchor in that file, does not exist."""
    problems = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", FENCE.sub("", text)):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists():
            problems.append(f"link {target}: no such file")
        elif anchor and linked.suffix == ".md":
            linked_text = text if not path else linked.read_text()
            if anchor not in _anchors(linked_text):
                problems.append(f"link {target}: no such heading")
    return problems


def readme_config_table_misses(readme: str) -> list[str]:
    """Run options without their `| --flag | BRIDGE_VAR` row in the README's table."""
    return [
        f"{o.flag} / {o.env}"
        for o in config.RUN_OPTIONS
        if not re.search(rf"^\| `{o.flag}` \| `{o.env}`", readme, re.M)
    ]


def readme_type_table_misses(readme: str, t: Truth) -> list[str]:
    table = re.search(r"^\| type .*?\n(.*?)\n\n", readme, re.S | re.M)
    assert table, "README.md has no event type table"
    listed = set(re.findall(r"`([a-z]+\.[a-z]+)`", table.group(1)))
    return [k for k in t.kinds if k not in listed]


# ---------------------------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize(
    "doc",
    DOCS,
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_doc_agrees_with_the_code(doc: Path) -> None:
    assert problems(doc.read_text(), truth()) == []


@pytest.mark.parametrize(
    "doc", [*DOCS, REPO / "CHANGELOG.md"], ids=lambda p: str(p.relative_to(REPO))
)
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    assert broken_links(doc.read_text(), doc) == []


def test_a_broken_link_is_reported() -> None:
    doc = REPO / "docs" / "runbooks.md"
    text = "## Log queries\n[a](operations.md#no-such) [b](nowhere.md) [c](#log-queries)"
    found = broken_links(text, doc)
    assert found == ["link operations.md#no-such: no such heading", "link nowhere.md: no such file"]


def test_readme_lists_every_event_kind() -> None:
    assert readme_type_table_misses((REPO / "README.md").read_text(), truth()) == []


def test_readme_has_a_row_for_every_run_option() -> None:
    assert readme_config_table_misses((REPO / "README.md").read_text()) == []
    assert "--topic / BRIDGE_TOPIC" in readme_config_table_misses("| `--sink` | `BRIDGE_SINK` |")


def test_terraform_readme_documents_every_variable_and_output() -> None:
    text = (REPO / "terraform" / "README.md").read_text()
    assert "## Inputs\n" in text and "## Outputs\n" in text
    assert check_terraform_names(text, truth()) == []


def test_the_architecture_map_has_one_entry_per_module() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    mapped = set(re.findall(r"^- \*\*`([a-z0-9_]+)`\*\*", text, re.M))
    assert mapped == truth().modules - {"__init__", "__main__"}


def test_the_deployments_agree_on_the_metrics_port() -> None:
    """The image, the module's template, the Ops Agent's scrape and the Windows service."""
    sources = {
        "terraform/locals.tf": r"metrics_port\s*=\s*(\d+)",
        "deploy/ops-agent/config.yaml": r"targets: \[\"127\.0\.0\.1:(\d+)\"\]",
        "deploy/windows/install-service.ps1": r"\[int\]\$HttpPort = (\d+)",
    }
    for path, pattern in sources.items():
        found = re.search(pattern, (REPO / path).read_text())
        assert found, f"{path}: no metrics port found"
        assert int(found.group(1)) == truth().metrics_port, path


def test_the_docs_name_the_module_topic() -> None:
    assert truth().topic_name == "maintenance-bridge-events"
    assert any(f"topics/{truth().topic_name}" in d.read_text() for d in DOCS)


PLANTED: list[tuple[str, str]] = [
    ("```sh\nmaintenance-bridge stats --json\n```\n", "no such subcommand"),
    (
        "```sh\nsudo BRIDGE_TOPIC=x maintenance-bridge run \\\n  --exec-timout 5\n```\n",
        "--exec-timout",
    ),
    ("Run `maintenance-bridge status --state-dir D --follow`.", "--follow"),
    ("`/opt/x/bin/maintenance-bridge listen --subscriptions S`", "--subscriptions"),
    ("Set `--hearbeat-interval`.", "--hearbeat-interval"),
    ("Set `BRIDGE_HEARTBEAT=300`.", "BRIDGE_HEARTBEAT"),
    ("`--http-port 9464` serves /metrics", "9464"),
    ("curl http://127.0.0.1:9090/metrics", "9090"),
    ("the image listens on port 9464", "9464"),
    ("set `var.topic` to", "var.topic"),
    ('"$(terraform output -raw topic)"', "output topic"),
    ("## Inputs\n\n| `no_such_variable` | `string` |\n", "no_such_variable"),
    ("## Inputs\n\n| `notify` | `object` | `{}` | `enabled` (true), `colour` (red). |\n", "colour"),
    ("## Inputs\n\n| `notify` | `object` | `{}` | `enabled` (true). |\n", "notify.chat_format"),
    ("`maintenance-bridge run --topic projects/P/topics/maintenance-events`", "maintenance-events"),
    ("gcloud pubsub subscriptions create s --topic=maintenance-events", "maintenance-events"),
    ("when `preemption.stopped` arrives", "preemption.stopped"),
    ("every `bridge.heartbeats` event", "bridge.heartbeats"),
    ("`--exec KIND=CMD` runs it", "KIND=CMD"),
    ('query `jsonPayload.logger="bridge"`', "jsonPayload.logger"),
]


@pytest.mark.parametrize(("snippet", "reported"), PLANTED)
def test_a_planted_inconsistency_is_reported(snippet: str, reported: str) -> None:
    found = problems(snippet, truth())
    assert any(reported in p for p in found), found


def test_consistent_snippets_pass() -> None:
    t = truth()
    snippet = (
        "```sh\n$ GCE_METADATA_HOST=127.0.0.1:8089 maintenance-bridge run --state-dir /tmp/mb &\n"
        f"maintenance-bridge run --topic projects/P/topics/{t.topic_name} --http-port "
        f"{t.metrics_port}\nsystemctl restart maintenance-bridge\n```\n"
        f"`maintenance-bridge --version`, `--exec {t.hook_filter}=CMD`, `BRIDGE_KIND`, "
        f"`var.name`, `maintenance.started`, `bridge.relay`, port {t.metrics_port}, "
        'jsonPayload.logger=~"^bridge"\n'
    )
    assert problems(snippet, t) == []


def test_the_readme_type_table_check_reports_a_missing_kind() -> None:
    readme = "| type | when |\n| --- | --- |\n| `maintenance.started` | x |\n\n"
    assert "preemption.changed" in readme_type_table_misses(readme, truth())
