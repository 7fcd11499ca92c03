"""Every google_* resource and data source under terraform/ against the provider's real schema.

`terraform validate` cannot download the google provider here, so names, nesting and required
arguments are checked against @cdktf/provider-google, which is generated from that provider's
schema (tests/support/provider_schema.py). A planted-mistake fixture proves the check can fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.provider_schema import PACKAGE, Provider, check

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "terraform"
FIXTURE = REPO / "tests" / "fixtures" / "provider-schema" / "mistakes.tf"
PINNED = "16.12.1"  # scripts/bootstrap installs this version


@pytest.fixture(scope="module")
def provider() -> Provider:
    if not (PACKAGE / "package.json").is_file():
        pytest.skip(
            f"@cdktf/provider-google is not installed in {PACKAGE.relative_to(REPO)}: "
            "run `scripts/bootstrap --tools` (needs npm)"
        )
    return Provider()


def tf_files() -> list[Path]:
    return sorted(p for p in MODULE.rglob("*.tf") if ".terraform" not in p.parts)


def test_the_installed_package_is_the_pinned_provider(provider: Provider) -> None:
    assert provider.version == PINNED
    assert provider.provider_version == "6.50.0"
    assert f"schema_version={PINNED}\n" in (REPO / "scripts" / "bootstrap").read_text()


def test_every_configuration_requires_the_checked_provider_release(provider: Provider) -> None:
    """`~> 6.50` admits the schema checked here and later 6.x, never an older one."""
    major, minor, _ = provider.provider_version.split(".")
    configurations = sorted(MODULE.rglob("versions.tf"))
    assert len(configurations) >= 2  # the module and its example
    for path in configurations:
        assert f'version = "~> {major}.{minor}"' in path.read_text(), path


def test_schema_extraction_matches_the_provider_docs(provider: Provider) -> None:
    """Facts from the provider's documentation, read back through the extractor."""
    topic = provider.schema("resource", "google_pubsub_topic")
    assert topic
    assert topic.fields["name"].required and topic.fields["name"].block is None
    assert not topic.fields["kms_key_name"].required
    settings = topic.fields["schema_settings"].block
    assert settings and settings.fields["schema"].required
    assert not settings.fields["encoding"].required
    template = provider.schema("resource", "google_compute_instance_template")
    assert template and template.fields["disk"].required and template.fields["disk"].block
    function = provider.schema("resource", "google_cloudfunctions2_function")
    assert function
    build = function.fields["build_config"].block
    assert build and "service_account" in build.fields
    source = build.fields["source"].block
    assert source and source.fields["storage_source"].block
    assert provider.schema("data", "google_project")
    assert provider.schema("resource", "google_project")
    assert provider.schema("resource", "google_pubsub_topics") is None
    assert provider.schema("data", "google_pubsub_subscriptionz") is None


def test_module_and_examples_match_the_provider_schema(provider: Provider) -> None:
    problems, checked = check(provider, tf_files(), REPO)
    assert not problems, "\n".join(map(str, problems))
    # Every google_* block type written anywhere under terraform/ was checked.
    written = {
        (kind, name)
        for path in tf_files()
        for kind, name in re.findall(r'^(resource|data) "(google_\w+)"', path.read_text(), re.M)
    }
    assert written and written <= checked
    assert ("provider", "google") in checked


PLANTED = [
    "resource google_pubsub_topics.unknown_type: unknown resource type 'google_pubsub_topics'",
    "data google_projet.unknown_data: unknown data source type 'google_projet'",
    "resource google_pubsub_topic.unknown_attribute: unknown attribute or block "
    "'message_retention'",
    "resource google_pubsub_subscription.unknown_nested_block > push_config: unknown attribute "
    "or block 'oidc'",
    "resource google_pubsub_subscription.missing_topic: missing required attribute 'topic'",
    "resource google_project_iam_member.missing_nested_required > condition: missing required "
    "attribute 'title'",
    "resource google_compute_instance_template.missing_block: missing required block 'disk'",
    "resource google_pubsub_topic.block_as_attribute: 'schema_settings' is a block, written as "
    "an attribute",
    "resource google_storage_bucket.dynamic_mistakes > dynamic versioning: unknown attribute or "
    "block 'enable'",
    "resource google_storage_bucket.dynamic_mistakes > dynamic versioning: missing required "
    "attribute 'enabled'",
    "resource google_storage_bucket.dynamic_mistakes: unknown block 'retention' (dynamic)",
    "resource google_service_account.bad_lifecycle > lifecycle: unknown argument "
    "'prevent_destroy_always'",
]


@pytest.fixture(scope="module")
def reported(provider: Provider) -> list[str]:
    problems, _ = check(provider, [FIXTURE], FIXTURE.parent)
    return [str(p).removeprefix(f"{FIXTURE.name}: ") for p in problems]


@pytest.mark.parametrize("mistake", PLANTED, ids=lambda m: m.split(":")[0])
def test_a_planted_mistake_is_reported(reported: list[str], mistake: str) -> None:
    assert mistake in reported, "\n".join(reported)


def test_nothing_but_the_planted_mistakes_is_reported(reported: list[str]) -> None:
    """The fixture's valid blocks (meta-arguments, dynamic blocks, iterators) raise nothing."""
    assert sorted(reported) == sorted(PLANTED)
