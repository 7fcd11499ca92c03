# Values computed from the variables (and files) alone, no resource attributes: kept apart so
# that tests/test_terraform.py can evaluate them offline with `terraform console`.

locals {
  topic_name = coalesce(var.topic_name, "${var.name}-events")
  labels     = merge({ "managed-by" = "terraform", "app" = "maintenance-bridge" }, var.labels)

  notify_secret_id = coalesce(var.notify.webhook_secret_id, "${var.name}-chat-webhook")

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

  drain_backends = var.drain.backends
  drain_zones    = distinct([for b in local.drain_backends : b.zone])

  function_settings = {
    notify = {
      enabled       = var.notify.enabled
      description   = "Posts maintenance events to a chat webhook (${var.notify.chat_format})."
      max_instances = var.notify.max_instances
      env = {
        WEBHOOK_SECRET = "projects/${var.project_id}/secrets/${local.notify_secret_id}"
        CHAT_FORMAT    = var.notify.chat_format
        EVENT_FILTER   = jsonencode(local.filters.notify)
      }
    }
    ledger = {
      enabled       = var.ledger.enabled
      description   = "Keeps one Firestore document per instance: maintenance state and history."
      max_instances = var.ledger.max_instances
      env = {
        GOOGLE_CLOUD_PROJECT = var.project_id
        FIRESTORE_DATABASE   = var.ledger.database
        LEDGER_COLLECTION    = var.ledger.collection
        HISTORY_LIMIT        = tostring(var.ledger.history_limit)
        EVENT_FILTER         = jsonencode(local.filters.ledger)
      }
    }
    drain = {
      enabled     = var.drain.enabled
      description = "Takes an instance out of its load-balancer backend during maintenance."
      # One instance: its de-duplication and ordering memory is per instance.
      max_instances = 1
      env = {
        DRAIN_TARGETS      = jsonencode(local.drain_backends)
        DRAIN_METADATA_KEY = var.drain.metadata_key
        EVENT_FILTER       = jsonencode(local.filters.drain)
      }
    }
  }
  functions    = { for fn, s in local.function_settings : fn => s if s.enabled }
  any_function = length(local.functions) > 0

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
  ))

  bridge_topic = "projects/${var.project_id}/topics/${local.topic_name}"
  bridge_env = merge(
    { BRIDGE_TOPIC = local.bridge_topic, BRIDGE_STATE_DIR = "/var/lib/maintenance-bridge" },
    var.example_instance_template.bridge_settings,
  )

  # The project's installer (deploy/install.sh: venv, /etc/default/maintenance-bridge, hardened
  # systemd unit; idempotent, so it runs on every boot) when the module sits in its repository.
  install_sh = fileexists("${path.module}/../deploy/install.sh") ? file("${path.module}/../deploy/install.sh") : ""

  startup_via_install = join("\n", concat(
    ["#!/bin/bash", "set -euo pipefail", "cat > /run/maintenance-bridge-install.sh <<'INSTALL_SH'"],
    [trimsuffix(local.install_sh, "\n"), "INSTALL_SH"],
    [for k, v in local.bridge_env : "export ${k}='${v}'"],
    ["bash /run/maintenance-bridge-install.sh '${var.example_instance_template.bridge_package}'", ""],
  ))

  # Fallback when the module is used without the rest of the repository: the same service, minimal.
  startup_inline = <<-EOT
    #!/bin/bash
    set -euo pipefail
    venv=/opt/maintenance-bridge/venv
    if [ ! -x "$venv/bin/maintenance-bridge" ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet --disable-pip-version-check '${var.example_instance_template.bridge_package}'
    fi
    cat > /etc/systemd/system/maintenance-bridge.service <<'UNIT'
    [Unit]
    Description=Compute Engine maintenance notices to Pub/Sub (maintenance-bridge)
    Wants=network-online.target
    After=network-online.target
    StartLimitIntervalSec=0

    [Service]
    ExecStart=/opt/maintenance-bridge/venv/bin/maintenance-bridge run --topic ${local.bridge_topic} --state-dir /var/lib/maintenance-bridge
    EnvironmentFile=-/etc/default/maintenance-bridge
    Restart=always
    RestartSec=1
    DynamicUser=yes
    StateDirectory=maintenance-bridge
    StateDirectoryMode=0700
    NoNewPrivileges=yes
    ProtectSystem=strict
    ProtectHome=yes
    PrivateTmp=yes

    [Install]
    WantedBy=multi-user.target
    UNIT
    cat > /etc/default/maintenance-bridge <<'ENV'
    ${join("\n", [for k, v in local.bridge_env : "${k}=${v}"])}
    ENV
    systemctl daemon-reload
    systemctl enable maintenance-bridge.service
    systemctl restart maintenance-bridge.service
  EOT

  startup_script = local.install_sh != "" ? local.startup_via_install : local.startup_inline
}
