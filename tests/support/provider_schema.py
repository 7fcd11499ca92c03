"""The google provider's schema, offline, and a check of .tf files against it.

`terraform validate` needs the provider binary, which cannot be downloaded here. The npm package
@cdktf/provider-google is generated from the provider's own schema (16.12.1 from hashicorp/google
6.50.0), one folder per resource: `lib/<name>/index.js` maps every argument and nested block to
its Terraform name (`synthesizeHclAttributes` and the `*ToHclTerraform` functions, which also say
whether it is a block), and the config interfaces of `index.d.ts` mark optional ones with `?`.
`check` holds configuration to that the way `terraform validate` does for names, nesting and
required arguments; types and values are not checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
from hcl2.utils import SerializationOptions

PACKAGE = (
    Path(__file__).resolve().parents[2]
    / ".tools/provider-schema/node_modules/@cdktf/provider-google"
)

# What Terraform itself interprets in a block of each kind, so the provider never sees it.
_COMMON = frozenset({"count", "for_each", "depends_on", "provider", "lifecycle"})
META_ARGUMENTS = {
    "resource": _COMMON | {"provisioner", "connection"},
    "data": _COMMON,
    "provider": frozenset({"alias"}),
}
LIFECYCLE = {
    "create_before_destroy",
    "prevent_destroy",
    "ignore_changes",
    "replace_triggered_by",
    "precondition",
    "postcondition",
}
DYNAMIC = {"for_each", "iterator", "labels", "content"}

_ENTRY = re.compile(r'^\s+"?(\w+)"?: \{\n\s+value: ([^\n]*),\n\s+isBlock: (true|false),', re.M)
_INTERFACE = re.compile(r"^export interface (\w+)(?: extends [^{]+)? \{\n(.*?)^\}", re.M | re.S)
_MEMBER = re.compile(r"^\s+readonly (\w+)(\?)?:", re.M)


@dataclass(frozen=True)
class Field:
    required: bool
    block: Schema | None  # a nested block's own schema; None for an attribute


@dataclass(frozen=True)
class Schema:
    fields: dict[str, Field]


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class Provider:
    """Schemas of the google provider's resources, data sources and provider block."""

    def __init__(self, package: Path = PACKAGE) -> None:
        self.lib = package / "lib"
        meta = json.loads((package / "package.json").read_text())
        self.version: str = meta["version"]
        self.provider_version: str = meta["cdktf"]["provider"]["version"]
        self._cache: dict[tuple[str, str], Schema | None] = {}

    def schema(self, kind: str, type_name: str) -> Schema | None:
        """The schema of `kind` ("resource", "data" or "provider") `type_name`; None if unknown."""
        key = (kind, type_name)
        if key not in self._cache:
            self._cache[key] = self._load(kind, type_name)
        return self._cache[key]

    def _load(self, kind: str, type_name: str) -> Schema | None:
        # The package's folder naming; the tfResourceType check below guards it.
        stem = type_name.removeprefix("google_").replace("_", "-")
        folder = {"resource": stem, "data": f"data-{type_name.replace('_', '-')}"}.get(
            kind, "provider"
        )
        js_path = self.lib / folder / "index.js"
        if not type_name.startswith("google") or not js_path.is_file():
            return None
        js = js_path.read_text()
        declared = re.search(r'^(\w+)\.tfResourceType = "([^"]+)";', js, re.M)
        base = {"resource": "TerraformResource", "data": "TerraformDataSource"}.get(
            kind, "TerraformProvider"
        )
        if not declared or declared[2] != type_name or f"extends cdktf.{base} " not in js:
            return None
        interfaces = {
            name: {m[1]: not m[2] for m in _MEMBER.finditer(body)}
            for name, body in _INTERFACE.findall((self.lib / folder / "index.d.ts").read_text())
        }
        top = js.split("synthesizeHclAttributes() {", 1)[1]
        return _schema(js, top, interfaces, f"{declared[1]}Config")


def _section(text: str) -> str:
    """The `attrs` literal of the generated function `text` starts with (`{}` when empty)."""
    start = text.index("const attrs = {")
    return text[start : text.index("};", start)]


def _schema(js: str, source: str, interfaces: dict[str, dict[str, bool]], interface: str) -> Schema:
    """The fields of the generated function `source` starts with; `interface` marks the required."""
    required = interfaces[interface]
    section = _section(source)
    entries = _ENTRY.findall(section)
    assert len(entries) == section.count("isBlock:"), f"{interface}: an entry was not understood"
    fields: dict[str, Field] = {}
    for tf_name, value, is_block in entries:
        camel = re.findall(r"(?:this\._|struct\.)(\w+)", value)[-1]
        nested = re.search(r"(?<![.\w])(\w+)ToHclTerraform\b", value)
        block = None
        if is_block == "true":
            assert nested, f"{interface}.{tf_name}: a block without a generated struct"
            name = nested[1]
            start = js.index(f"function {name}ToHclTerraform(struct) {{")
            block = _schema(js, js[start:], interfaces, name[0].upper() + name[1:])
        fields[tf_name] = Field(required=required[camel], block=block)
    return Schema(fields)


def load(path: Path) -> dict[str, Any]:
    """A .tf file with blocks marked (`__is_block__`), so `x = {...}` and `x {...}` differ."""
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=True)
    with path.open() as f:
        return hcl2.load(f, serialization_options=options)


def _keys(node: dict[str, Any]) -> list[str]:
    """The keys of a parsed block, without python-hcl2's markers (__is_block__, __comments__)."""
    return [key for key in node if not key.startswith("__")]


def _is_block(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, dict) and v.get("__is_block__") for v in value
    )


def check(
    provider: Provider, paths: Iterable[Path], base: Path
) -> tuple[list[Problem], set[tuple[str, str]]]:
    """Problems in every google_* resource, data source and google provider block of `paths`.

    Also returns the (kind, type) pairs that were checked, so a caller can tell that nothing
    was passed over.
    """
    problems: list[Problem] = []
    checked: set[tuple[str, str]] = set()
    for path in paths:
        doc = load(path)
        where = str(path.relative_to(base))
        for kind in ("resource", "data"):
            for entry in doc.get(kind, []):
                for type_name, named in entry.items():
                    if not type_name.startswith("google_"):
                        continue  # another provider's (archive_file, ...)
                    checked.add((kind, type_name))
                    schema = provider.schema(kind, type_name)
                    for name, body in named.items():
                        at = f"{where}: {kind} {type_name}.{name}"
                        if schema is None:
                            what = "resource" if kind == "resource" else "data source"
                            problems.append(Problem(at, f"unknown {what} type {type_name!r}"))
                        else:
                            problems += _check_body(schema, body, at, META_ARGUMENTS[kind])
        for entry in doc.get("provider", []):
            for name, body in entry.items():
                if name == "google":
                    checked.add(("provider", name))
                    schema = provider.schema("provider", name)
                    assert schema, "the package has no provider schema"
                    at = f"{where}: provider {name}"
                    problems += _check_body(schema, body, at, META_ARGUMENTS["provider"])
    return problems, checked


def _check_body(
    schema: Schema, body: dict[str, Any], where: str, meta: frozenset[str] = frozenset()
) -> list[Problem]:
    problems: list[Problem] = []
    present: set[str] = set()
    for key in _keys(body):
        value = body[key]
        if key == "lifecycle" and key in meta:
            problems += [
                Problem(f"{where} > lifecycle", f"unknown argument {unknown!r}")
                for item in value
                for unknown in sorted(set(_keys(item)) - LIFECYCLE)
            ]
            continue
        if key in meta:
            continue
        if key == "dynamic":
            for item in value:
                for name in _keys(item):
                    present.add(name)
                    problems += _check_dynamic(schema, name, item[name], where)
            continue
        field = schema.fields.get(key)
        if field is None:
            problems.append(Problem(where, f"unknown attribute or block {key!r}"))
            continue
        present.add(key)
        if field.block is None and _is_block(value):
            problems.append(Problem(where, f"{key!r} is an attribute, written as a block"))
        elif field.block is not None and not _is_block(value):
            problems.append(Problem(where, f"{key!r} is a block, written as an attribute"))
        elif field.block is not None:
            for item in value:
                problems += _check_body(field.block, item, f"{where} > {key}")
    for name, field in schema.fields.items():
        if field.required and name not in present:
            what = "block" if field.block else "attribute"
            problems.append(Problem(where, f"missing required {what} {name!r}"))
    return problems


def _check_dynamic(schema: Schema, name: str, spec: dict[str, Any], where: str) -> list[Problem]:
    at = f"{where} > dynamic {name}"
    problems = [
        Problem(at, f"unknown argument {key!r}") for key in sorted(set(_keys(spec)) - DYNAMIC)
    ]
    problems += [
        Problem(at, f"missing {key!r}") for key in ("for_each", "content") if key not in spec
    ]
    field = schema.fields.get(name)
    if field is None:
        problems.append(Problem(where, f"unknown block {name!r} (dynamic)"))
    elif field.block is None:
        problems.append(Problem(where, f"{name!r} is an attribute, not a block (dynamic)"))
    else:
        for content in spec.get("content", []):
            problems += _check_body(field.block, content, at)
    return problems
