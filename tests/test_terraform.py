"""Static checks of the Terraform module: formatting, wiring, least privilege, checkov.

`terraform init`/`validate` need the google provider from the registry, which this machine cannot
reach, so the module is checked by `terraform fmt`, by reading every .tf with python-hcl2 and
asserting how the resources are wired, and by checkov's policies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "terraform"
TF_FILES = sorted(p for p in MODULE.rglob("*.tf") if ".terraform" not in p.parts)
CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"


def load(path: Path) -> dict[str, Any]:
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
    with path.open() as f:
        return hcl2.load(f, serialization_options=options)


@pytest.fixture(scope="module")
def module() -> dict[str, Any]:
    """The root module's blocks, merged: resources as {type: {name: body}}."""
    merged: dict[str, Any] = {
        "resource": {},
        "data": {},
        "variable": {},
        "output": {},
        "locals": {},
    }
    for path in MODULE.glob("*.tf"):
        doc = load(path)
        for kind in ("resource", "data"):
            for block in doc.get(kind, []):
                for rtype, named in block.items():
                    merged[kind].setdefault(rtype, {}).update(named)
        for kind in ("variable", "output"):
            for block in doc.get(kind, []):
                merged[kind].update(block)
        for block in doc.get("locals", []):
            merged["locals"].update(block)
        if "terraform" in doc:
            merged["terraform"] = doc["terraform"]
    return merged


def resources(module: dict[str, Any], rtype: str) -> dict[str, Any]:
    return module["resource"].get(rtype, {})


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    """A nested block, static or `dynamic` (its content)."""
    if name in body:
        value = body[name]
        return value[0] if isinstance(value, list) else value
    for dyn in body.get("dynamic", []):
        if name in dyn:
            return dyn[name]["content"][0]
    raise KeyError(name)


def walk(node: Any) -> Iterator[str]:
    """Every string in a parsed document."""
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)
    elif isinstance(node, str):
        yield node


# --- formatting and parsing -------------------------------------------------------------------


def test_terraform_fmt(tmp_path: Path) -> None:
    terraform = shutil.which("terraform")
    if not terraform:
        pytest.skip("no terraform binary on PATH; formatting is not checked")
    config = tmp_path / "terraformrc"
    config.write_text("")  # silences the warning about a missing CLI config
    env = {**os.environ, "TF_CLI_CONFIG_FILE": str(config), "CHECKPOINT_DISABLE": "1"}
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(MODULE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: str(p.relative_to(MODULE)))
def test_every_tf_file_parses(path: Path) -> None:
    assert load(path), f"{path} is empty"


def test_google_provider_is_pinned(module) -> None:
    providers = module["terraform"][0]["required_providers"][0]
    assert providers["google"] == {"source": "hashicorp/google", "version": "~> 6.50"}
    assert "google-beta" not in providers


# --- wiring -----------------------------------------------------------------------------------


def test_function_triggers_point_at_the_module_topic(module) -> None:
    functions = resources(module, "google_cloudfunctions2_function")
    assert functions, "no Cloud Functions (gen2) in the module"
    for name, fn in functions.items():
        if name == "board":  # an HTTP function, no trigger: tests/test_board.py
            continue
        if name == "system_events":  # triggered by the log topic: test_system_events_wiring
            continue
        if name == "autopilot":  # HTTP, called by Cloud Scheduler: test_autopilot_wiring
            continue
        trigger = block(fn, "event_trigger")
        assert trigger["pubsub_topic"] == "${google_pubsub_topic.events.id}", name
        assert trigger["event_type"] == "google.cloud.pubsub.topic.v1.messagePublished"
        assert trigger["retry_policy"] == "RETRY_POLICY_RETRY"
        assert trigger["service_account_email"] == "${google_service_account.invoker[0].email}"
        build = block(fn, "build_config")
        assert build["runtime"] == "python312"
        service = block(fn, "service_config")
        assert service["service_account_email"] == (
            "${google_service_account.function[each.key].email}"
        ), "each function runs as its own service account"
        assert service["ingress_settings"] == "ALLOW_INTERNAL_ONLY"
    for name, sub in resources(module, "google_pubsub_subscription").items():
        if name not in ("dead_letter", "system_events_push"):
            assert sub["topic"] == "${google_pubsub_topic.events.id}", name
    push = resources(module, "google_pubsub_subscription")["push"]
    assert (
        "google_cloudfunctions2_function.function[each.key]"
        in block(push, "push_config")["push_endpoint"]
    )


def test_system_events_wiring(module) -> None:
    """Sink -> log topic (its writer identity the only publisher) -> function (Eventarc or a
    push subscription with the main topic's dead letters) -> the main topic."""
    sinks = {
        kind: resources(module, f"google_logging_{kind}_sink")["system_events"]
        for kind in ("project", "folder", "organization")
    }
    for kind, sink in sinks.items():
        assert sink["destination"] == (
            "pubsub.googleapis.com/${google_pubsub_topic.system_events[0].id}"
        ), kind
        assert sink["filter"] == "${local.system_events_filter}", kind
        assert f'var.system_events.scope == "{kind}"' in sink["count"], kind
    assert sinks["project"]["unique_writer_identity"] is True
    assert sinks["folder"]["include_children"] == "${var.system_events.include_children}"
    assert sinks["organization"]["include_children"] == "${var.system_events.include_children}"
    filter_text = (MODULE / "system_events.tf").read_text()
    for part in (
        'log_id(\\"cloudaudit.googleapis.com/system_event\\")',
        'resource.type=\\"gce_instance\\"',
        'protoPayload.serviceName=\\"compute.googleapis.com\\"',
    ):
        assert part in filter_text, part
    topic = resources(module, "google_pubsub_topic")["system_events"]
    main = resources(module, "google_pubsub_topic")["events"]
    for safety in ("message_retention_duration", "kms_key_name"):
        assert topic[safety] == main[safety], safety
    grants = resources(module, "google_pubsub_topic_iam_member")
    writer = grants["system_events_writer"]
    assert writer["topic"] == "${google_pubsub_topic.system_events[0].name}"
    assert (writer["role"], writer["member"]) == (
        "roles/pubsub.publisher",
        "${local.system_events_writer}",
    )
    publisher = grants["system_events_publisher"]
    assert publisher["topic"] == "${google_pubsub_topic.events.name}"
    assert "google_service_account.system_events[0].email" in publisher["member"]
    fn = resources(module, "google_cloudfunctions2_function")["system_events"]
    trigger = block(fn, "event_trigger")
    assert trigger["pubsub_topic"] == "${google_pubsub_topic.system_events[0].id}"
    assert trigger["retry_policy"] == "RETRY_POLICY_RETRY"
    assert block(fn, "build_config")["entry_point"] == "handle"
    service = block(fn, "service_config")
    assert service["environment_variables"]["EVENTS_TOPIC"] == "${google_pubsub_topic.events.id}"
    assert service["ingress_settings"] == "ALLOW_INTERNAL_ONLY"
    push = resources(module, "google_pubsub_subscription")["system_events_push"]
    assert push["topic"] == "${google_pubsub_topic.system_events[0].id}"
    dead = block(push, "dead_letter_policy")
    assert dead["dead_letter_topic"] == "${google_pubsub_topic.dead_letter.id}"
    assert "local.system_events" in module["locals"]["function_archives"]


def test_one_function_per_example_directory(module) -> None:
    settings = module["locals"]["function_settings"]
    folders = [p for p in (MODULE / "functions").iterdir() if p.is_dir()]
    on_disk = {p.name for p in folders if not p.name.startswith("_")}
    assert (
        set(settings)
        == on_disk - {"board", "system-events", "autopilot"}
        == {
            "notify",
            "ledger",
            "drain",
        }
    )
    for name in on_disk:
        assert (MODULE / "functions" / name / "main.py").is_file()
        assert (MODULE / "functions" / name / "requirements.txt").is_file()


def test_publisher_iam_is_topic_scoped_never_project_wide(module) -> None:
    grant = resources(module, "google_pubsub_topic_iam_member")["publisher"]
    assert grant["topic"] == "${google_pubsub_topic.events.name}"
    assert grant["role"] == "roles/pubsub.publisher"
    assert grant["for_each"] == "${local.publishers}"
    for rtype in (
        "google_project_iam_member",
        "google_project_iam_binding",
        "google_project_iam_policy",
    ):
        for name, body in resources(module, rtype).items():
            text = json.dumps(body)
            assert "pubsub" not in body.get("role", ""), (
                f"{rtype}.{name} grants Pub/Sub project-wide"
            )
            assert "publisher" not in text, f"{rtype}.{name} involves the publisher identity"
            if name == "build_logs":  # log writing has no narrower resource to grant it on
                assert body["role"] == "roles/logging.logWriter"
                assert body["member"] == "serviceAccount:${google_service_account.build[0].email}"
                continue
            if name == "vm_telemetry":  # the Ops Agent's writes: no narrower scope either
                roles = re.findall(r"roles/[\w.]+", body["for_each"])
                assert roles == ["roles/logging.logWriter", "roles/monitoring.metricWriter"]
                assert body["member"] == "serviceAccount:${local.vm_service_account}"
                continue
            assert "condition" in body, f"{rtype}.{name} is project-wide without a condition"
    for rtype in ("google_project_iam_binding", "google_project_iam_policy"):
        assert not resources(module, rtype), f"authoritative {rtype} would clobber others' grants"


def test_every_subscription_has_a_dead_letter_policy(module) -> None:
    subs = resources(module, "google_pubsub_subscription")
    delivering = module["locals"]["delivering_subscriptions"]
    for name, sub in subs.items():
        if sub["topic"] == "${google_pubsub_topic.dead_letter.id}":
            continue  # the dead-letter sink itself: the end of the line
        policy = block(sub, "dead_letter_policy")
        assert policy["dead_letter_topic"] == "${google_pubsub_topic.dead_letter.id}", name
        assert policy["max_delivery_attempts"] == "${var.max_delivery_attempts}", name
        # ... and the Pub/Sub service agent may take messages off it to dead-letter them.
        assert f"google_pubsub_subscription.{name}" in delivering, name
    agent = "${local.pubsub_agent}"
    sub_grant = resources(module, "google_pubsub_subscription_iam_member")["dead_letter_subscriber"]
    assert sub_grant == {
        "for_each": "${local.delivering_subscriptions}",
        "project": "${var.project_id}",
        "subscription": "${each.value}",
        "role": "roles/pubsub.subscriber",
        "member": agent,
        "depends_on": ["${google_project_service.apis}"],
    }
    topic_grant = resources(module, "google_pubsub_topic_iam_member")["dead_letter_publisher"]
    assert topic_grant["topic"] == "${google_pubsub_topic.dead_letter.name}"
    assert topic_grant["role"] == "roles/pubsub.publisher"
    assert topic_grant["member"] == agent
    assert "gcp-sa-pubsub.iam.gserviceaccount.com" in module["locals"]["pubsub_agent"]


def test_topic_schema_retention_and_key(module) -> None:
    topic = resources(module, "google_pubsub_topic")["events"]
    assert topic["message_retention_duration"] == "${var.message_retention_duration}"
    assert topic["kms_key_name"] == "${var.kms_key_name}"
    settings = block(topic, "schema_settings")
    assert settings == {"schema": "${google_pubsub_schema.event_data[0].id}", "encoding": "JSON"}
    schema = resources(module, "google_pubsub_schema")["event_data"]
    assert schema["type"] == '${var.topic_schema_type == "avro" ? "AVRO" : "PROTOCOL_BUFFER"}'
    assert schema["count"] == "${var.attach_schema ? 1 : 0}"
    assert "/../schemas/v1/event-data.proto" in schema["definition"]
    assert module["variable"]["attach_schema"]["default"] is True


def test_topics_wait_for_the_key_grant_of_the_pubsub_agent(module) -> None:
    """With kms_key_name, a topic created before the agent may use the key fails to create."""
    grant = resources(module, "google_kms_crypto_key_iam_member")["pubsub_agent"]
    assert grant["count"] == "${var.kms_key_name == null ? 0 : 1}"
    assert grant["crypto_key_id"] == "${var.kms_key_name}"
    assert grant["role"] == "roles/cloudkms.cryptoKeyEncrypterDecrypter"
    assert grant["member"] == "${local.pubsub_agent}"
    for name in ("events", "dead_letter"):
        topic = resources(module, "google_pubsub_topic")[name]
        assert topic["kms_key_name"] == "${var.kms_key_name}", name
        assert "${google_kms_crypto_key_iam_member.pubsub_agent}" in topic["depends_on"], name


def test_identities_and_service_agent_grants_wait_for_the_apis(module) -> None:
    """A first apply must not race the API enablement (the agents appear with their APIs)."""
    apis = "${google_project_service.apis}"
    waiting = [
        *(("google_service_account", name) for name in resources(module, "google_service_account")),
        ("google_project_iam_custom_role", "drain"),
        ("google_artifact_registry_repository", "functions"),
    ]
    for rtype, bodies in module["resource"].items():
        if rtype.endswith("_iam_member"):
            waiting += [
                (rtype, name)
                for name, body in bodies.items()
                if body.get("member") == "${local.pubsub_agent}"
            ]
    assert len(waiting) >= 11, waiting
    for rtype, name in waiting:
        assert apis in resources(module, rtype)[name].get("depends_on", []), f"{rtype}.{name}"


def test_function_builds_use_a_dedicated_least_privilege_account(module) -> None:
    build_account = "serviceAccount:${google_service_account.build[0].email}"
    for name, fn in resources(module, "google_cloudfunctions2_function").items():
        build = block(fn, "build_config")
        assert build["service_account"] == "${google_service_account.build[0].id}", name
        assert build["docker_repository"] == (
            "${google_artifact_registry_repository.functions[0].id}"
        ), name
        assert "${time_sleep.build_grants}" in fn["depends_on"], name
    # ... which waits for every grant to the build account, and then for IAM to propagate.
    wait = resources(module, "time_sleep")["build_grants"]
    assert wait["create_duration"] == "60s"
    assert set(wait["depends_on"]) == {
        "${google_project_iam_member.build_logs}",
        "${google_artifact_registry_repository_iam_member.build}",
        "${google_storage_bucket_iam_member.build_source}",
    }
    grants = {
        (rtype, name): body
        for rtype, bodies in module["resource"].items()
        if rtype.endswith("_iam_member")
        for name, body in bodies.items()
        if body.get("member") == build_account
    }
    assert {(rtype, body["role"]) for (rtype, _), body in grants.items()} == {
        ("google_project_iam_member", "roles/logging.logWriter"),
        ("google_artifact_registry_repository_iam_member", "roles/artifactregistry.writer"),
        ("google_storage_bucket_iam_member", "roles/storage.objectViewer"),
    }
    repo_grant = resources(module, "google_artifact_registry_repository_iam_member")["build"]
    assert repo_grant["repository"] == "${google_artifact_registry_repository.functions[0].name}"
    bucket_grant = resources(module, "google_storage_bucket_iam_member")["build_source"]
    assert bucket_grant["bucket"] == "${google_storage_bucket.functions_source[0].name}"


def test_source_bucket_is_locked_down(module) -> None:
    bucket = resources(module, "google_storage_bucket")["functions_source"]
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert block(bucket, "versioning")["enabled"] is True
    assert bucket["force_destroy"] is False
    everything = json.dumps(module)
    assert "allUsers" not in everything and "allAuthenticatedUsers" not in everything


def test_function_zips_vendor_the_decoder(module) -> None:
    """The zips' file list is functions/archive.json alone (test_functions.py builds from it)."""
    archive = module["data"]["archive_file"]["function"]
    assert "source" not in archive, "a file zipped outside functions/archive.json"
    (dynamic,) = archive["dynamic"]
    assert "/functions/archive.json" in dynamic["source"]["for_each"]
    files = json.loads((MODULE / "functions" / "archive.json").read_text(encoding="utf-8"))["files"]
    assert set(files) == {
        "main.py",
        "requirements.txt",
        "subscriber.py",
        "bridge/__init__.py",
        "bridge/events.py",
        "bridge/origin.py",  # verified origin: each function checks who signed an event
        "bridge/keys.py",
        "bridge/cloud_kinds.py",  # the cloud's kinds, which the decoder accepts
        "bridge/system_events.py",  # the system-events function's converter
    }
    for fn in ("notify", "ledger", "drain"):
        for filename, relative in files.items():
            path = MODULE / relative.replace("{function}", fn)
            assert path.resolve().is_file(), f"{fn}: {filename}: {relative} does not exist"
        requirements = (MODULE / "functions" / fn / "requirements.txt").read_text()
        assert "functions-framework" in requirements


def test_functions_have_least_privilege(module) -> None:
    everything = "\n".join(walk(module))
    for broad in (
        "roles/owner",
        "roles/editor",
        "roles/compute.admin",
        "roles/compute.instanceAdmin",
    ):
        assert broad not in everything
    secret = resources(module, "google_secret_manager_secret_iam_member")["notify"]
    assert secret["role"] == "roles/secretmanager.secretAccessor"
    assert secret["secret_id"] == "${local.notify_secret}"
    assert 'function["notify"]' in secret["member"]
    ledger = resources(module, "google_project_iam_member")["ledger"]
    assert ledger["role"] == "roles/datastore.user"
    assert "/databases/${var.ledger.database}" in block(ledger, "condition")["expression"]
    role = resources(module, "google_project_iam_custom_role")["drain"]
    permissions = "".join(walk(role["permissions"]))
    assert "*" not in permissions and "delete" not in permissions
    assert "compute.instanceGroups.update" in permissions
    drain = resources(module, "google_project_iam_member")["drain"]
    assert drain["role"] == "${google_project_iam_custom_role.drain[0].id}"
    assert "instanceGroups" in block(drain, "condition")["expression"]
    invoker = resources(module, "google_cloud_run_v2_service_iam_member")["invoker"]
    assert invoker["role"] == "roles/run.invoker"
    assert invoker["name"] == "${google_cloudfunctions2_function.function[each.key].name}"


def test_bigquery_history_subscription(module) -> None:
    sub = resources(module, "google_pubsub_subscription")["bigquery"]
    config = block(sub, "bigquery_config")
    assert config["write_metadata"] is True
    table = resources(module, "google_bigquery_table")["history"]
    columns = {c["name"] for c in json.loads(_jsonencode_literal(table["schema"]))}
    assert {"subscription_name", "message_id", "publish_time", "attributes", "data"} <= columns


def _jsonencode_literal(expr: str) -> str:
    """Turn `${jsonencode([{name = "x", ...}])}` into JSON (only plain literals are used)."""
    inner = expr.removeprefix("${jsonencode(").removesuffix(")}")
    return re.sub(r"(\w+) = ", r'"\1": ', inner)


def test_example_vm_runs_the_bridge_as_publisher(module) -> None:
    template = resources(module, "google_compute_instance_template")["bridge"]
    assert block(template, "service_account")["email"] == "${local.vm_service_account}"
    assert "access_config" not in block(template, "network_interface")
    assert block(template, "shielded_instance_config")["enable_secure_boot"] is True
    assert template["metadata"]["startup-script"] == "${local.startup_script}"
    (precondition,) = template["lifecycle"][0]["precondition"]
    assert "scripts/build-release" in precondition["error_message"]
    reader = resources(module, "google_storage_bucket_iam_member")["vm_artifact_reader"]
    assert reader["role"] == "roles/storage.objectViewer"
    assert "objects/${a.object}" in reader["condition"][0]["expression"]


def test_variables_are_typed_described_and_validated(module) -> None:
    for name, var in module["variable"].items():
        assert var.get("type"), f"variable {name} has no type"
        assert var.get("description"), f"variable {name} has no description"
        if var["type"] != "bool":
            assert var.get("validation"), f"variable {name} has no validation block"


def test_outputs_cover_topic_subscriptions_functions_and_accounts(module) -> None:
    outputs = module["output"]
    for name in (
        "topic_id",
        "subscriptions",
        "functions",
        "service_accounts",
        "dead_letter_topic_id",
        "publisher_service_accounts",
    ):
        assert name in outputs, name
    for name, out in outputs.items():
        assert out.get("description"), f"output {name} has no description"


def test_readme_documents_every_input_and_output(module) -> None:
    readme = (MODULE / "README.md").read_text()
    inputs = readme.split("## Inputs", 1)[1].split("## Outputs", 1)[0]
    outputs = readme.split("## Outputs", 1)[1].split("\n## ", 1)[0]
    for name in module["variable"]:
        assert f"| `{name}` |" in inputs, f"README: input {name} missing"
    for name in module["output"]:
        assert f"| `{name}` |" in outputs, f"README: output {name} missing"
    assert "terraform init" in readme and "validate" in readme  # says why they are not run


def test_example_calls_the_module() -> None:
    doc = load(MODULE / "examples" / "basic" / "main.tf")
    call = doc["module"][0]["maintenance_bridge"]
    assert call["source"] == "../.."
    assert call["project_id"] == "${var.project_id}"


def test_multi_project_example_is_a_hub_with_a_folder_sink_and_foreign_publishers() -> None:
    """The hub holds the topic, functions and board; the folder sink covers every project
    under it; each VM project's account may publish to the hub's topic and nothing else."""
    example = MODULE / "examples" / "multi-project"
    doc = load(example / "main.tf")
    call = doc["module"][0]["maintenance_bridge"]
    assert call["project_id"] == "${var.hub_project_id}"
    assert call["system_events"] == {
        "scope": "folder",
        "folder_id": "${var.folder_id}",
        "include_children": True,
    }
    assert call["enable_board"] is True and call["create_publisher_service_account"] is False
    assert call["publisher_service_account_emails"] == "${values(local.vm_service_accounts)}"
    assert call["depends_on"] == ["${google_service_account.vm}"]
    (accounts,) = [b["google_service_account"]["vm"] for b in doc["resource"]]
    assert (
        accounts["project"] == "${each.key}" and accounts["for_each"] == "${toset(var.vm_projects)}"
    )
    emails = doc["locals"][0]["vm_service_accounts"]
    assert f"{accounts['account_id']}@${{p}}.iam.gserviceaccount.com" in emails
    # The example grants nothing itself: the module's topic-scoped grant is the only one.
    assert not [r for b in doc["resource"] for r in b if "iam" in r]


def test_examples_call_the_module_with_known_inputs_and_outputs(module) -> None:
    """What `terraform validate` would say of the calls: known inputs, required ones given."""
    required = {name for name, var in module["variable"].items() if "default" not in var}
    meta = {"source", "version", "providers", "count", "for_each", "depends_on"}
    calls = 0
    for path in sorted((MODULE / "examples").rglob("*.tf")):
        text = path.read_text()
        for call in load(path).get("module", []):
            for name, args in call.items():
                calls += 1
                given = set(args) - meta
                assert given <= set(module["variable"]), f"{path.name}: {name}: unknown inputs"
                assert required <= given, f"{path.name}: {name}: required inputs missing"
        used = set(re.findall(r"module\.maintenance_bridge\.(\w+)", text))
        assert used <= set(module["output"]), f"{path.name}: unknown outputs {used}"
    assert calls >= 1


# --- locals evaluated by terraform console -----------------------------------------------------
#
# locals.tf only depends on variables and files, so `terraform console` evaluates it without a
# provider: the templates, filters and variable validations run for real.


class Console:
    """`terraform console` on a copy of variables.tf + locals.tf, laid out like the repository."""

    def __init__(self, root: Path, terraform: str) -> None:
        self.dir = root / "terraform"
        self.terraform = terraform
        config = root / "terraformrc"
        config.write_text("")
        self.env = {**os.environ, "TF_CLI_CONFIG_FILE": str(config), "CHECKPOINT_DISABLE": "1"}

    def run(self, expression: str, **variables: Any) -> subprocess.CompletedProcess[str]:
        args = [self.terraform, "console", "-no-color", "-var", "project_id=my-project"]
        for name, value in variables.items():
            rendered = value if isinstance(value, str) else json.dumps(value)
            args += ["-var", f"{name}={rendered}"]
        return subprocess.run(
            args,
            input=expression + "\n",
            capture_output=True,
            text=True,
            cwd=self.dir,
            env=self.env,
            timeout=60,
        )

    def eval(self, expression: str, **variables: Any) -> Any:
        result = self.run(f"jsonencode({expression})", **variables)
        assert "Error" not in result.stderr, result.stderr
        return json.loads(json.loads(result.stdout.strip().splitlines()[-1]))


def _console(tmp_path: Path, with_repo_files: bool) -> Console:
    terraform = shutil.which("terraform")
    if not terraform:
        pytest.skip("no terraform binary on PATH; locals are not evaluated")
    (tmp_path / "terraform").mkdir()
    for name in ("variables.tf", "locals.tf"):
        shutil.copy(MODULE / name, tmp_path / "terraform" / name)
    if with_repo_files:
        (tmp_path / "deploy").symlink_to(REPO / "deploy")
    return Console(tmp_path, terraform)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Console:
    return _console(tmp_path_factory.mktemp("console"), with_repo_files=True)


def _bash_n(script: str, tmp_path: Path) -> None:
    path = tmp_path / "startup.sh"
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_startup_script_installs_only_a_verified_wheel(console: Console, tmp_path: Path) -> None:
    """The rendered script itself runs in tests/test_release.py; here, what goes into it."""
    wheel = tmp_path / "maintenance_bridge-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    script = console.eval(
        "local.startup_script",
        example_instance_template={
            "bridge_wheel": str(wheel),
            "bridge_settings": {"BRIDGE_HEARTBEAT_INTERVAL": "300"},
        },
    )
    for name in ("install.sh", "vm-install.sh", "constraints.txt", "ops-agent/config.yaml"):
        assert (REPO / "deploy" / name).read_text().strip() in script, name
    object_name = f"maintenance-bridge/{digest}/{wheel.name}"
    for line in (
        f"export MB_WHEEL_URL='gs://my-project-maintenance-bridge-src/{object_name}'",
        f"export MB_WHEEL_SHA256='{digest}'",
        "export BRIDGE_TOPIC='projects/my-project/topics/maintenance-bridge-events'",
        "export BRIDGE_HTTP_HOST='127.0.0.1'",
        "export BRIDGE_HTTP_PORT='8799'",
        "export BRIDGE_HEARTBEAT_INTERVAL='300'",
        "export MB_OPS_AGENT='install'",
    ):
        assert line in script.splitlines(), line
    assert script.rstrip().endswith('exec bash "$root/vm-install.sh"')
    _bash_n(script, tmp_path)


def test_startup_script_never_names_an_unpinned_package(console: Console) -> None:
    env = console.eval(
        "local.vm_install_env",
        example_instance_template={
            "bridge_package": "maintenance-bridge==0.1.0",
            "bridge_package_hashes": ["a" * 64],
        },
    )
    assert env["MB_PACKAGE"] == "maintenance-bridge==0.1.0"
    assert env["MB_PACKAGE_HASHES"] == "a" * 64
    assert "MB_WHEEL_URL" not in env


def test_function_settings_match_what_the_functions_parse(console: Console) -> None:
    """The EVENT_FILTER / DRAIN_TARGETS Terraform writes are what the Python code reads."""
    import importlib.util
    import sys

    backends = [
        {"zone": "us-central1-a", "name": "web"},
        {"type": "network_endpoint_group", "zone": "us-central1-b", "name": "neg", "port": 8080},
    ]
    settings = console.eval(
        "local.functions",
        notify={"kinds": ["maintenance.started"], "attributes": {"ce-zone": ["us-central1-a"]}},
        drain={"backends": backends, "metadata_key": "drain-backends"},
        ledger={"enabled": False},
    )
    assert set(settings) == {"notify", "drain"}
    sys.path.insert(0, str(MODULE / "functions" / "_shared"))
    try:
        spec = importlib.util.spec_from_file_location(
            "tf_subscriber", MODULE / "functions" / "_shared" / "subscriber.py"
        )
        assert spec and spec.loader
        subscriber = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(subscriber)
    finally:
        sys.path.remove(str(MODULE / "functions" / "_shared"))
    wanted = subscriber.load_filter(settings["notify"]["env"]["EVENT_FILTER"])
    assert wanted == {
        "ce-type": frozenset({"io.github.maintenancebridge.gce.v1.maintenance.started"}),
        "ce-zone": frozenset({"us-central1-a"}),
    }
    targets = json.loads(settings["drain"]["env"]["DRAIN_TARGETS"])
    assert [t["type"] for t in targets] == ["instance_group", "network_endpoint_group"]
    assert all(set(t) == {"type", "zone", "name", "port"} for t in targets)
    assert settings["drain"]["max_instances"] == 1
    assert settings["notify"]["env"]["WEBHOOK_SECRET"] == (
        "projects/my-project/secrets/maintenance-bridge-chat-webhook"
    )
    expression = console.eval(
        "local.filter_expressions.notify",
        notify={"kinds": ["maintenance.started", "maintenance.ended"]},
    )
    assert expression == (
        '(attributes.ce-type = "io.github.maintenancebridge.gce.v1.maintenance.started"'
        ' OR attributes.ce-type = "io.github.maintenancebridge.gce.v1.maintenance.ended")'
    )


def test_verified_origin_is_on_by_default_everywhere(console: Console) -> None:
    """The template's VM attests, every consuming function requires it and knows the
    system-events function's account (the one the module creates for it, never a VM's), and
    the policy the environment gives is the one the functions' subscriber.py parses."""
    from bridge.origin import GOOGLE_CERTS_URL, Policy

    assert console.eval("local.bridge_env")["BRIDGE_ATTEST"] == "on"
    settings = console.eval("local.functions")
    assert set(settings) == {"notify", "ledger", "drain"}
    identity = "maintenance-bridge-sysev@my-project.iam.gserviceaccount.com"
    assert console.eval("local.system_events_identity") == identity
    for name, fn in settings.items():
        policy = Policy.from_env(fn["env"])
        assert policy == Policy(True, GOOGLE_CERTS_URL, identity), name
        assert "ATTESTATION_CERTS_URL" not in fn["env"], name  # Google's, the default
    relaxed = console.eval(
        "local.functions",
        require_attestation=False,
        attestation_certs_url="http://127.0.0.1:9/certs",
        system_events={"enabled": False},
    )
    for name, fn in relaxed.items():
        assert Policy.from_env(fn["env"]) == Policy(False, "http://127.0.0.1:9/certs", ""), name
    overridden = {"bridge_settings": {"BRIDGE_ATTEST": "off"}}
    assert (
        console.eval("local.bridge_env", example_instance_template=overridden)["BRIDGE_ATTEST"]
        == "off"
    )


def test_the_cloud_identity_is_the_system_events_account_and_no_vms(module) -> None:
    account = resources(module, "google_service_account")["system_events"]
    assert account["account_id"] == "${local.system_events_account_id}"
    precondition = block(block(account, "lifecycle"), "precondition")
    assert "var.publisher_service_account_emails" in precondition["condition"]
    assert "local.system_events_identity" in precondition["condition"]


def test_kind_validation_lists_every_kind_the_bridge_emits() -> None:
    from bridge.cloud_kinds import CLOUD_KINDS
    from bridge.keys import KINDS

    text = (MODULE / "locals.tf").read_text()
    for name, expected in (("bridge_kinds", KINDS), ("cloud_kinds", CLOUD_KINDS)):
        kinds = re.search(rf"^  {name} += (\[[^\]]*\])$", text, re.M)
        assert kinds and json.loads(kinds.group(1)) == list(expected), name
    assert re.search(r"^  kinds += concat\(local.bridge_kinds, local.cloud_kinds\)$", text, re.M)
    text = (MODULE / "variables.tf").read_text()
    for fn in ("notify", "ledger", "drain"):
        assert f"for k in var.{fn}.kinds : contains(local.kinds, k)" in text, fn


def test_defaults_pass_validation(console: Console) -> None:
    result = console.run("local.topic_name")
    assert "Error" not in result.stderr, result.stderr
    assert result.stdout.strip().splitlines()[-1] == '"maintenance-bridge-events"'


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("name", "x"),
        ("name", "a-name-that-is-far-too-long"),
        ("project_id", "Not_A_Project"),
        ("region", "moon"),
        ("message_retention_duration", "5s"),
        ("max_delivery_attempts", 3),
        ("kms_key_name", "my-key"),
        ("function_delivery", "carrier-pigeon"),
        ("publisher_service_account_emails", ["someone@example.com"]),
        ("notify", {"chat_format": "teams"}),
        ("notify", {"kinds": ["maintenance.begun"]}),
        ("notify", {"attributes": {"zone": ["us-central1-a"]}}),
        ("ledger", {"history_limit": 0}),
        ("drain", {"backends": [{"type": "lb", "zone": "us-central1-a", "name": "x"}]}),
        ("bigquery_history", {"dataset_id": "has-dashes"}),
        ("example_instance_template", {"bridge_settings": {"TOPIC": "x"}}),
        (
            "example_instance_template",
            {"bridge_package": "maintenance-bridge", "bridge_package_hashes": ["a" * 64]},
        ),
        ("example_instance_template", {"bridge_package": "maintenance-bridge==0.1.0"}),
        ("example_instance_template", {"bridge_wheel": "/tmp/something.tar.gz"}),
        ("example_instance_template", {"bridge_settings": {"BRIDGE_PUBSUB_TRANSPORT": "grpc"}}),
        ("attestation_certs_url", "file:///etc/certs.json"),
        ("monitoring", {"notification_channels": ["email:me@example.com"]}),
        ("autopilot_policy", {"windows": [{"days": ["monday"], "start": "01:00", "end": "02:00"}]}),
        ("autopilot_policy", {"windows": [{"days": ["mon"], "start": "1:00", "end": "02:00"}]}),
        ("autopilot_policy", {"windows": [{"days": ["mon"], "start": "01:00", "end": "24:01"}]}),
        (
            "autopilot_policy",
            {"windows": [{"days": ["mon"], "start": "01:00", "end": "02:00", "time_zone": "CET!"}]},
        ),
        ("autopilot_policy", {"max_per_zone": 0}),
        ("autopilot_policy", {"max_per_zone": 1.5}),
        ("autopilot_policy", {"deadline_margin_hours": -1}),
        ("autopilot_policy", {"group_by": "rack"}),
        ("autopilot_policy", {"leave_alone_label": "no-equals-sign"}),
        ("autopilot_policy", {"pre_hook_url": "ftp://example.com/drain"}),
        ("autopilot_schedule", "every 5 minutes"),
        ("autopilot_operators", ["me@example.com"]),
    ],
)
def test_validation_rejects(console: Console, variable: str, value: Any) -> None:
    result = console.run("1", **{variable: value})
    assert "Invalid value for variable" in result.stderr, (variable, value, result.stderr)


# --- checkov ----------------------------------------------------------------------------------


def test_checkov_skips_are_inline_with_reasons() -> None:
    for path in TF_FILES:
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                match = re.search(r"checkov:skip=(CKV2?_[A-Z]+_\d+):(.{10,})", line)
                assert match, f"{path.name}: a skip without an id and a reason: {line.strip()}"


def test_checkov_reports_no_failed_checks() -> None:
    if not CHECKOV.exists():
        pytest.skip("checkov is not installed: run `scripts/bootstrap --tools` (.venv-tools)")
    result = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(MODULE),
            "--framework",
            "terraform",
            "--compact",
            "--quiet",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
        timeout=300,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in r["results"]["failed_checks"]]
    summary = [f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in failed]
    assert not failed, "\n".join(summary)
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 0, "checkov evaluated nothing"


# --- autopilot (terraform/autopilot.tf, docs/autopilot.md) -------------------------------------


def test_autopilot_wiring(module) -> None:
    """Scheduler (OIDC as its own account, invoker on the autopilot only) -> the HTTP function
    (its own account: a custom role of exactly two permissions, the ledger's database only)."""
    fn = resources(module, "google_cloudfunctions2_function")["autopilot"]
    assert block(fn, "build_config")["entry_point"] == "tick"
    assert 'google_storage_bucket_object.function[\\"autopilot\\"]' in json.dumps(fn)
    service = block(fn, "service_config")
    assert service["max_instance_count"] == 1 and service["max_instance_request_concurrency"] == 1
    assert "ALLOW_INTERNAL_ONLY" in service["ingress_settings"]
    env = service["environment_variables"]
    assert env["AUTOPILOT_POLICY"] == "${jsonencode(var.autopilot_policy)}"
    assert env["LEDGER_COLLECTION"] == "${var.ledger.collection}"
    assert service["service_account_email"] == "${google_service_account.autopilot[0].email}"
    role = resources(module, "google_project_iam_custom_role")["autopilot"]
    assert role["permissions"] == ["compute.instances.get", "compute.instances.performMaintenance"]
    members = resources(module, "google_project_iam_member")
    assert members["autopilot"]["role"] == "${google_project_iam_custom_role.autopilot[0].id}"
    ledger = members["autopilot_ledger"]
    assert ledger["role"] == "roles/datastore.user"
    assert "/databases/${var.ledger.database}" in block(ledger, "condition")["expression"]
    job = resources(module, "google_cloud_scheduler_job")["autopilot"]
    target = block(job, "http_target")
    oidc = block(target, "oidc_token")
    assert oidc["service_account_email"] == (
        "${google_service_account.autopilot_scheduler[0].email}"
    )
    assert (
        oidc["audience"]
        == target["uri"]
        == ("${google_cloudfunctions2_function.autopilot[0].service_config[0].uri}")
    )
    assert job["schedule"] == "${var.autopilot_schedule}"
    invoker = resources(module, "google_cloud_run_v2_service_iam_member")["autopilot_scheduler"]
    assert invoker["role"] == "roles/run.invoker"
    assert "autopilot_scheduler[0].email" in invoker["member"]
    for resource in (fn, role, job, members["autopilot"], ledger, invoker):
        assert resource["count"] == "${var.enable_autopilot ? 1 : 0}"
    assert module["variable"]["enable_autopilot"]["default"] is False
    assert "local.autopilot_archive" in module["locals"]["function_archives"]


def test_autopilot_policy_renders_what_the_function_parses(console: Console) -> None:
    """The Terraform object's JSON, defaults filled in, is a policy plan.py accepts as meant."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "autopilot_plan_tf", MODULE / "functions" / "autopilot" / "plan.py"
    )
    assert spec and spec.loader
    plan = importlib.util.module_from_spec(spec)
    sys.modules["autopilot_plan_tf"] = plan
    spec.loader.exec_module(plan)
    given = {
        "windows": [
            {"days": ["sat", "sun"], "start": "22:00", "end": "06:00", "time_zone": "Europe/Berlin"}
        ],
        "max_per_zone": 2,
        "group_by": "mig",
        "leave_alone": ["db-*"],
    }
    rendered = console.eval("var.autopilot_policy", autopilot_policy=given)
    policy = plan.Policy.from_dict(rendered)
    assert policy.max_per_zone == 2 and policy.group_by == "mig"
    assert policy.deadline_margin.total_seconds() == 24 * 3600  # the variable's default
    (window,) = policy.windows
    assert window.days == {5, 6} and str(window.zone) == "Europe/Berlin"
    assert policy.left_alone("db-1", {}) and not policy.dry_run
    default = plan.Policy.from_dict(console.eval("var.autopilot_policy"))
    assert default.windows == () and default.max_per_zone == 1


def test_checkov_passes_the_autopilot_when_enabled(tmp_path: Path) -> None:
    """Off by default, the autopilot's resources are not evaluated by the default run: here they
    are created (enable_autopilot = true) and every check on them passes."""
    if not CHECKOV.exists():
        pytest.skip("checkov is not installed: run `scripts/bootstrap --tools` (.venv-tools)")
    tfvars = tmp_path / "autopilot.tfvars"
    tfvars.write_text('project_id = "my-project"\nenable_autopilot = true\n')
    result = subprocess.run(
        [
            *(str(CHECKOV), "-d", str(MODULE), "--var-file", str(tfvars), "--framework"),
            *("terraform", "--compact", "--skip-download", "--output", "json"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
        timeout=300,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    checks = [
        c
        for r in reports
        for kind in ("passed_checks", "failed_checks")
        for c in r["results"][kind]
        if ".autopilot" in c["resource"]
    ]
    assert len(checks) >= 3, "checkov evaluated none of the autopilot's resources"
    failed = [
        f"{c['check_id']} {c['resource']}"
        for c in checks
        if c["check_result"]["result"] != "PASSED"
    ]
    assert not failed, failed
