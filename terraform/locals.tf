# Values computed from the variables (and files) alone, no resource attributes: kept apart so
# that tests/test_terraform.py can evaluate them offline with `terraform console`.

locals {
  topic_name = coalesce(var.topic_name, "${var.name}-events")
  labels     = merge({ "managed-by" = "terraform", "app" = "maintenance-bridge" }, var.labels)

  notify_secret_id = coalesce(var.notify.webhook_secret_id, "${var.name}-chat-webhook")

  # Every event kind the bridge emits (bridge/keys.py KINDS; tests/test_terraform.py holds them
  # equal): what the functions' `kinds` settings may name.
  bridge_kinds = ["maintenance.started", "maintenance.changed", "maintenance.ended", "preemption.started", "preemption.changed", "preemption.ended", "upcoming.scheduled", "upcoming.updated", "upcoming.cleared", "bridge.heartbeat"]
  # And the cloud's (bridge/cloud_kinds.py CLOUD_KINDS, held equal too), made by system-events.
  cloud_kinds = ["cloud.host_error", "cloud.automatic_restart", "cloud.preempted", "cloud.migrated", "cloud.terminated_for_maintenance", "cloud.guest_terminated", "cloud.halted_for_restart", "cloud.recreated", "cloud.maintenance_scheduled", "cloud.maintenance_updated", "cloud.maintenance_completed", "cloud.system_event"]
  kinds       = concat(local.bridge_kinds, local.cloud_kinds)

  # Attribute filters per function: kinds expand to full ce-type values. Applied inside the
  # function always (EVENT_FILTER) and, with function_delivery = "push", by Pub/Sub as well.
  filters = {
    for fn, cfg in { notify = var.notify, ledger = var.ledger, drain = var.drain } : fn => merge(
      length(cfg.kinds) > 0 ? { "ce-type" = [for k in cfg.kinds : "${var.type_prefix}.${k}"] } : {},
      cfg.attributes,
    )
  }
  filter_expressions = {
    for fn, f in local.filters : fn => join(" AND ", [
      for attr, values in f : length(values) == 1
      ? "attributes.${attr} = \"${values[0]}\""
      : "(${join(" OR ", [for v in values : "attributes.${attr} = \"${v}\""])})"
    ])
  }

  # Verified origin (docs/events.md): what every consuming function checks events against. The
  # cloud's events are signed by the system-events function's own account (system_events.tf
  # creates it under this id), which no VM runs as: a VM cannot speak as the cloud.
  system_events_account_id = "${var.name}-sysev"
  system_events_identity   = var.system_events.enabled ? "${local.system_events_account_id}@${var.project_id}.iam.gserviceaccount.com" : ""
  origin_env = merge(
    {
      REQUIRE_ATTESTATION   = tostring(var.require_attestation)
      CLOUD_EVENTS_IDENTITY = local.system_events_identity
    },
    var.attestation_certs_url != "" ? { ATTESTATION_CERTS_URL = var.attestation_certs_url } : {},
  )

  drain_backends = var.drain.backends
  drain_zones    = distinct([for b in local.drain_backends : b.zone])

  function_settings = {
    notify = {
      enabled       = var.notify.enabled
      description   = "Posts maintenance events to a chat webhook (${var.notify.chat_format})."
      max_instances = var.notify.max_instances
      env = merge(local.origin_env, {
        WEBHOOK_SECRET = "projects/${var.project_id}/secrets/${local.notify_secret_id}"
        CHAT_FORMAT    = var.notify.chat_format
        EVENT_FILTER   = jsonencode(local.filters.notify)
      })
    }
    ledger = {
      enabled       = var.ledger.enabled
      description   = "Keeps one Firestore document per instance: maintenance state and history."
      max_instances = var.ledger.max_instances
      env = merge(local.origin_env, {
        GOOGLE_CLOUD_PROJECT = var.project_id
        FIRESTORE_DATABASE   = var.ledger.database
        LEDGER_COLLECTION    = var.ledger.collection
        HISTORY_LIMIT        = tostring(var.ledger.history_limit)
        EVENT_FILTER         = jsonencode(local.filters.ledger)
      })
    }
    drain = {
      enabled     = var.drain.enabled
      description = "Takes an instance out of its load-balancer backend during maintenance."
      # One instance: its de-duplication and ordering memory is per instance.
      max_instances = 1
      env = merge(local.origin_env, {
        DRAIN_TARGETS      = jsonencode(local.drain_backends)
        DRAIN_METADATA_KEY = var.drain.metadata_key
        EVENT_FILTER       = jsonencode(local.filters.drain)
      })
    }
  }
  functions    = { for fn, s in local.function_settings : fn => s if s.enabled }
  any_function = length(local.functions) > 0 || var.system_events.enabled # system_events.tf

  apis = toset(concat(
    ["pubsub.googleapis.com", "iam.googleapis.com"],
    local.any_function ? [
      "cloudfunctions.googleapis.com", "run.googleapis.com", "cloudbuild.googleapis.com",
      "artifactregistry.googleapis.com", "eventarc.googleapis.com", "storage.googleapis.com",
    ] : [],
    var.notify.enabled ? ["secretmanager.googleapis.com"] : [],
    var.ledger.enabled ? ["firestore.googleapis.com"] : [],
    var.drain.enabled || var.example_instance_template.enabled ? ["compute.googleapis.com"] : [],
    var.bigquery_history.enabled ? ["bigquery.googleapis.com"] : [],
    var.enable_autopilot ? ["cloudscheduler.googleapis.com", "compute.googleapis.com"] : [],
    var.monitoring.enabled ? ["monitoring.googleapis.com"] : [],
    var.example_instance_template.enabled ? ["storage.googleapis.com"] : [],
    var.example_instance_template.enabled && var.example_instance_template.ops_agent ? ["logging.googleapis.com", "monitoring.googleapis.com"] : [],
  ))

  bridge_topic = "projects/${var.project_id}/topics/${local.topic_name}"

  # --- the example VM: what it installs, how it is watched (vm.tf) ---------------------------
  vm = var.example_instance_template

  # The VM serves /metrics on loopback for the Ops Agent (deploy/ops-agent/config.yaml scrapes
  # this port) and sends heartbeats, which the "bridge silent" alert needs (monitoring.tf). It
  # attests every event with its identity token (verified origin), which the functions require.
  metrics_port = 8799
  bridge_env = merge(
    {
      BRIDGE_TOPIC              = local.bridge_topic
      BRIDGE_STATE_DIR          = "/var/lib/maintenance-bridge"
      BRIDGE_HTTP_HOST          = "127.0.0.1"
      BRIDGE_HTTP_PORT          = tostring(local.metrics_port)
      BRIDGE_HEARTBEAT_INTERVAL = "60"
      BRIDGE_ATTEST             = "on"
    },
    local.vm.bridge_settings,
  )

  # What the VM installs, only ever something whose sha256 Terraform knows: by default the one
  # wheel scripts/build-release left in dist/, uploaded to the module's bucket under its hash.
  dist_wheels = fileset("${path.module}/../dist", "maintenance_bridge-*.whl")
  wheel_path = local.vm.bridge_package != null ? null : coalesce(
    local.vm.bridge_wheel,
    length(local.dist_wheels) == 1 ? "${path.module}/../dist/${one(local.dist_wheels)}" : "-",
  )
  vm_artifacts = {
    for kind, path in { wheel = local.wheel_path, wheelhouse = local.vm.wheelhouse } :
    kind => {
      path   = path
      sha256 = filesha256(path)
      object = "maintenance-bridge/${filesha256(path)}/${basename(path)}"
    } if local.vm.enabled && path != null && path != "-"
  }
  artifact_bucket = "${var.project_id}-${var.name}-src"
  vm_install_env = merge(
    contains(keys(local.vm_artifacts), "wheel") ? {
      MB_WHEEL_URL    = "gs://${local.artifact_bucket}/${local.vm_artifacts.wheel.object}"
      MB_WHEEL_SHA256 = local.vm_artifacts.wheel.sha256
    } : {},
    contains(keys(local.vm_artifacts), "wheelhouse") ? {
      MB_WHEELHOUSE_URL    = "gs://${local.artifact_bucket}/${local.vm_artifacts.wheelhouse.object}"
      MB_WHEELHOUSE_SHA256 = local.vm_artifacts.wheelhouse.sha256
    } : {},
    local.vm.bridge_package != null ? {
      MB_PACKAGE        = local.vm.bridge_package
      MB_PACKAGE_HASHES = join(" ", local.vm.bridge_package_hashes)
    } : {},
    local.vm.ops_agent ? { MB_OPS_AGENT = "install" } : {},
  )

  # The start-up script: the repository's deploy/ files written out as they are (laid out as in
  # deploy/, where vm-install.sh finds them), the settings as exports, then vm-install.sh.
  # tests/test_release.py runs this very text; MB_ROOT lets it use another directory than /run.
  vm_files = ["install.sh", "constraints.txt", "ops-agent/config.yaml", "vm-install.sh"]
  startup_script = join("\n", flatten([
    "#!/bin/bash",
    "set -euo pipefail",
    "root=$${MB_ROOT:-/run/maintenance-bridge}",
    "install -d -m 0700 \"$root\" \"$root/ops-agent\"",
    [
      for name in local.vm_files : [
        "cat > \"$root/${name}\" <<'MAINTENANCE_BRIDGE_EOF'",
        trimsuffix(file("${path.module}/../deploy/${name}"), "\n"),
        "MAINTENANCE_BRIDGE_EOF",
      ]
    ],
    [for k, v in merge(local.vm_install_env, local.bridge_env) : "export ${k}='${v}'"],
    "exec bash \"$root/vm-install.sh\"",
    "",
  ]))
}
