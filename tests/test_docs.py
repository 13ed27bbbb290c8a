"""The docs against the code: the log schema's table, the configuration reference, and
links that lead somewhere. Docs that drift from the code fail here, not in a user's hands."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pydantic

from proxy.accesslog import RequestRecord
from proxy.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_LIMIT = 15_000  # bytes: the README is the five-minute guide, the rest is in docs/

# A table row whose first cell starts with a name in backticks: "| `name` | ...".
_ROW = re.compile(r"^\|\s*`([^`]+)`", re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def request_line_fields() -> set[str]:
    """Every field of the request log line, as the code defines it: the record's fields,
    plus what `AccessLog.request` and its timestamp processor add to each line."""
    return {field.name for field in dataclasses.fields(RequestRecord)} | {"event", "timestamp"}


def config_keys(model: type[pydantic.BaseModel] = Config, prefix: str = "") -> Iterator[str]:
    """Every key routes.yaml accepts, as a dotted path; a mapping of named entries (the
    backends) is `<name>`: `backends.<name>.timeouts.connect`."""
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        yield path
        for nested, through_mapping in _models_in(field.annotation):
            yield from config_keys(nested, f"{path}.<name>." if through_mapping else f"{path}.")


def _models_in(annotation: object) -> Iterator[tuple[type[pydantic.BaseModel], bool]]:
    """The config models inside a field's type (`X | None`, `dict[str, X]`), and whether a
    mapping leads to them."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        yield annotation, False
        return
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            yield from _models_in(arg)
    elif origin is dict:
        yield from ((model, True) for model, _ in _models_in(args[1]))


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a whole heading line), up to the next heading."""
    start = text.index(heading + "\n") + len(heading)
    end = re.search(r"^#+ ", text[start:], re.MULTILINE)
    return text[start : start + end.start()] if end else text[start:]


def test_log_schema_table_lists_exactly_the_request_line_fields() -> None:
    """docs/log-schema.md's request table has every field of the line, and no other."""
    table = _section((DOCS / "log-schema.md").read_text(), "## The request line")
    documented = set(_ROW.findall(table))
    fields = request_line_fields()
    assert not fields - documented, f"fields missing from the table: {fields - documented}"
    assert not documented - fields, f"table rows for no field: {documented - fields}"


def test_configuration_reference_has_every_key() -> None:
    """docs/configuration.md has a row for every key of the config models, and none for a
    key that does not exist."""
    documented = set(_ROW.findall((DOCS / "configuration.md").read_text()))
    keys = set(config_keys())
    assert not keys - documented, f"keys missing from docs/configuration.md: {keys - documented}"
    assert not documented - keys, f"rows for no key: {documented - keys}"


def test_config_key_walk_sees_nested_models() -> None:
    """The walk reaches keys behind `| None`, mappings and aliases, so the check above
    covers them."""
    keys = set(config_keys())
    assert {
        "listen.port",
        "backends.<name>.timeouts.first_token",
        "backends.<name>.launch.num_draft_tokens",
        "shadow.from",
        "auth.admin_token_env",
    } <= keys


def test_readme_is_short() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move detail to docs/"


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces
    to `-`."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", path.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_lead_to_files_and_anchors_that_exist() -> None:
    """Every relative link in README.md and docs/*.md names a file that exists, and a
    heading in it when the link has an anchor."""
    broken = []
    for source in _markdown_files():
        for target in _LINK.findall(source.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            path = (source.parent / file_part).resolve() if file_part else source
            if not path.exists():
                broken.append(f"{source.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{source.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_index_lists_every_doc() -> None:
    """docs/README.md links to every other page in docs/."""
    index = (DOCS / "README.md").read_text()
    linked = {target.partition("#")[0] for target in _LINK.findall(index)}
    pages = {path.name for path in DOCS.glob("*.md")} - {"README.md"}
    assert not pages - linked, f"pages missing from docs/README.md: {pages - linked}"
