variable "project_id" {
  description = "Project that hosts the topic, the functions and everything else."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a Google Cloud project ID (6-30 characters: a-z, 0-9, -)."
  }
}

variable "region" {
  description = "Region of the functions, their triggers, the source bucket and the example VM template."
  type        = string
  default     = "us-central1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a region name such as us-central1."
  }
}

variable "name" {
  description = "Prefix of every resource name (topic, subscriptions, service accounts, functions)."
  type        = string
  default     = "maintenance-bridge"

  validation {
    # 22 + the longest service-account suffix ("-invoker", 8) stays within the 30-character limit.
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}[a-z0-9]$", var.name))
    error_message = "name must be 4-22 characters of a-z, 0-9 and -, starting with a letter."
  }
}

variable "labels" {
  description = "Labels added to every resource that supports them."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([
      for k, v in var.labels : can(regex("^[a-z][a-z0-9_-]{0,62}$", k)) && can(regex("^[a-z0-9_-]{0,63}$", v))
    ])
    error_message = "Label keys must start with a lowercase letter; keys and values use a-z, 0-9, _ and - (63 characters at most)."
  }
}

variable "enable_apis" {
  description = "Enable the APIs the module uses (never disabled on destroy). Turn off where a platform team manages APIs."
  type        = bool
  default     = true
}

# --- topic ------------------------------------------------------------------------------------

variable "topic_name" {
  description = "Name of the events topic; defaults to \"<name>-events\"."
  type        = string
  default     = null

  validation {
    condition     = var.topic_name == null || can(regex("^[a-zA-Z][a-zA-Z0-9._~%+-]{2,254}$", var.topic_name))
    error_message = "topic_name must be a valid Pub/Sub topic name (3-255 characters, starting with a letter, not \"goog\")."
  }
}

variable "message_retention_duration" {
  description = "How long the topic keeps messages (seconds with an \"s\" suffix, 10 minutes to 31 days), so a new subscription can seek back and replay the fleet's recent events."
  type        = string
  default     = "604800s"

  validation {
    condition = (
      can(regex("^[0-9]+s$", var.message_retention_duration)) &&
      try(tonumber(trimsuffix(var.message_retention_duration, "s")) >= 600 && tonumber(trimsuffix(var.message_retention_duration, "s")) <= 2678400, false)
    )
    error_message = "message_retention_duration must be between \"600s\" and \"2678400s\"."
  }
}

variable "kms_key_name" {
  description = "Optional Cloud KMS key (projects/P/locations/L/keyRings/R/cryptoKeys/K) for the events and dead-letter topics. The module grants the Pub/Sub service agent roles/cloudkms.cryptoKeyEncrypterDecrypter on it. Null = Google-managed encryption."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_name == null || can(regex("^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$", var.kms_key_name))
    error_message = "kms_key_name must be a full crypto key name: projects/P/locations/L/keyRings/R/cryptoKeys/K."
  }
}

variable "attach_schema" {
  description = "Attach the event-data topic schema (see topic_schema_type) to the topic with JSON encoding, so Pub/Sub rejects a malformed payload at publish time. Only binary content mode passes schema validation."
  type        = bool
  default     = true
}

variable "topic_schema_type" {
  description = "Which event-data schema the topic enforces: \"avro\" (schemas/v1/event-data.avsc: the fields every event carries, unknown fields pass; proven on the official Pub/Sub emulator in the test suite) or \"protobuf\" (schemas/v1/event-data.proto: every field, unknown ones refused; the emulator cannot check it)."
  type        = string
  default     = "avro"

  validation {
    condition     = contains(["avro", "protobuf"], var.topic_schema_type)
    error_message = "topic_schema_type must be \"avro\" or \"protobuf\"."
  }
}

variable "type_prefix" {
  description = "CloudEvents type prefix the bridge is configured with; used to expand the kinds in the function filters into full ce-type values."
  type        = string
  default     = "io.github.maintenancebridge.gce.v1"

  validation {
    condition     = can(regex("^[a-z0-9]+(\\.[a-z0-9-]+)+$", var.type_prefix))
    error_message = "type_prefix must be a reverse-DNS name such as io.github.maintenancebridge.gce.v1."
  }
}

# --- dead letters -----------------------------------------------------------------------------

variable "max_delivery_attempts" {
  description = "Deliveries before a message goes to the dead-letter topic (applies to every subscription the module creates)."
  type        = number
  default     = 10

  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100 && floor(var.max_delivery_attempts) == var.max_delivery_attempts
    error_message = "max_delivery_attempts must be an integer from 5 to 100 (Pub/Sub's limits)."
  }
}

variable "dead_letter_retention_duration" {
  description = "How long the dead-letter subscription keeps undeliverable messages for inspection (seconds, 10 minutes to 7 days)."
  type        = string
  default     = "604800s"

  validation {
    condition = (
      can(regex("^[0-9]+s$", var.dead_letter_retention_duration)) &&
      try(tonumber(trimsuffix(var.dead_letter_retention_duration, "s")) >= 600 && tonumber(trimsuffix(var.dead_letter_retention_duration, "s")) <= 604800, false)
    )
    error_message = "dead_letter_retention_duration must be between \"600s\" and \"604800s\"."
  }
}

# --- publishers -------------------------------------------------------------------------------

variable "create_publisher_service_account" {
  description = "Create a service account for the VMs that run the bridge (granted publisher on this topic only)."
  type        = bool
  default     = true
}

variable "publisher_service_account_emails" {
  description = "Existing service accounts (e.g. the VMs' current ones) that get roles/pubsub.publisher on this topic only."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for e in var.publisher_service_account_emails : can(regex("^[a-z0-9-]+@[a-z0-9.-]+\\.gserviceaccount\\.com$", e))])
    error_message = "publisher_service_account_emails must be service account emails (...@....gserviceaccount.com)."
  }
}

# --- example subscribers ----------------------------------------------------------------------

variable "require_attestation" {
  description = "Verified origin (docs/events.md): REQUIRE_ATTESTATION of the consuming functions. true: drain does not act on an event whose origin is not verified (its VM's identity token, or the system-events function's for the cloud's events); false: it acts. The ledger, the board and notify mark unverified events either way. The example template attests (BRIDGE_ATTEST=on); turn this off only while bridges that do not attest are still publishing."
  type        = bool
  default     = true
}

variable "attestation_certs_url" {
  description = "ATTESTATION_CERTS_URL of the consuming functions: where the identity tokens' signing certificates are fetched ({kid: PEM}). Empty: Google's (https://www.googleapis.com/oauth2/v1/certs), the only right value for real tokens."
  type        = string
  default     = ""

  validation {
    condition     = var.attestation_certs_url == "" || can(regex("^https?://[^\\s]+$", var.attestation_certs_url))
    error_message = "attestation_certs_url must be an http(s) URL, or empty for Google's."
  }
}

variable "function_delivery" {
  description = <<-EOT
    How events reach the functions.
    "eventarc": an Eventarc Pub/Sub trigger per function (retry policy RETRY_POLICY_RETRY). Eventarc
    creates and owns the trigger's subscription, so Terraform can neither attach a dead-letter policy
    nor a server-side filter to it; attribute filters are applied inside the function.
    "push": the module creates one push subscription per function (attribute filter applied by
    Pub/Sub, dead-letter policy, exponential back-off) pushing to the function with an OIDC token.
  EOT
  type        = string
  default     = "eventarc"

  validation {
    condition     = contains(["eventarc", "push"], var.function_delivery)
    error_message = "function_delivery must be \"eventarc\" or \"push\"."
  }
}

variable "functions_source_location" {
  description = "Location of the bucket that holds the functions' source zips; defaults to the region."
  type        = string
  default     = null

  validation {
    condition     = var.functions_source_location == null || can(regex("^[a-zA-Z0-9-]+$", var.functions_source_location))
    error_message = "functions_source_location must be a Cloud Storage location such as us-central1 or US."
  }
}

variable "notify" {
  description = <<-EOT
    The chat notifier. webhook_secret_id: an existing Secret Manager secret (short id) holding the
    webhook URL; null creates "<name>-chat-webhook" (add the URL as a version after apply).
    chat_format: "google_chat" or "slack". kinds: event kinds to accept (empty = all), e.g.
    "maintenance.started". attributes: further attribute filters, attribute -> accepted values
    (e.g. {"ce-zone" = ["us-central1-a"]}).
  EOT
  type = object({
    enabled           = optional(bool, true)
    webhook_secret_id = optional(string)
    chat_format       = optional(string, "google_chat")
    kinds             = optional(list(string), [])
    attributes        = optional(map(list(string)), {})
    max_instances     = optional(number, 3)
  })
  default = {}

  validation {
    condition     = alltrue([for k in var.notify.kinds : contains(local.kinds, k)])
    error_message = "notify.kinds must list event kinds the bridge emits, e.g. maintenance.started."
  }
  validation {
    condition     = alltrue([for a, v in var.notify.attributes : can(regex("^ce-[a-z0-9]{1,20}$", a)) && length(v) > 0])
    error_message = "notify.attributes keys must be ce-* attribute names (e.g. ce-zone), each with at least one value."
  }

  validation {
    condition     = contains(["google_chat", "slack"], var.notify.chat_format)
    error_message = "notify.chat_format must be \"google_chat\" or \"slack\"."
  }
  validation {
    condition     = var.notify.webhook_secret_id == null || can(regex("^[a-zA-Z0-9_-]{1,255}$", coalesce(var.notify.webhook_secret_id, "x")))
    error_message = "notify.webhook_secret_id must be a secret's short id (letters, digits, _ and -)."
  }
  validation {
    condition     = var.notify.max_instances >= 1 && var.notify.max_instances <= 100
    error_message = "notify.max_instances must be from 1 to 100."
  }
}

variable "ledger" {
  description = "The Firestore ledger. database: an existing Firestore (native mode) database; collection: where the per-instance documents go. kinds / attributes: filters as for notify."
  type = object({
    enabled       = optional(bool, true)
    database      = optional(string, "(default)")
    collection    = optional(string, "maintenance-ledger")
    history_limit = optional(number, 50)
    kinds         = optional(list(string), [])
    attributes    = optional(map(list(string)), {})
    max_instances = optional(number, 3)
  })
  default = {}

  validation {
    condition     = alltrue([for k in var.ledger.kinds : contains(local.kinds, k)])
    error_message = "ledger.kinds must list event kinds the bridge emits, e.g. maintenance.started."
  }
  validation {
    condition     = alltrue([for a, v in var.ledger.attributes : can(regex("^ce-[a-z0-9]{1,20}$", a)) && length(v) > 0])
    error_message = "ledger.attributes keys must be ce-* attribute names (e.g. ce-zone), each with at least one value."
  }

  validation {
    condition     = can(regex("^[a-zA-Z0-9_-]{1,100}$", var.ledger.collection))
    error_message = "ledger.collection must be a plain collection id (letters, digits, _ and -)."
  }
  validation {
    condition     = var.ledger.history_limit >= 1 && var.ledger.history_limit <= 500
    error_message = "ledger.history_limit must be from 1 to 500 (it lives inside one document)."
  }
  validation {
    condition     = var.ledger.max_instances >= 1 && var.ledger.max_instances <= 100
    error_message = "ledger.max_instances must be from 1 to 100."
  }
}

variable "enable_board" {
  description = "Deploy the fleet board (functions/board, docs/board.md): a private page over the ledger's collection. Needs ledger.enabled."
  type        = bool
  default     = false
}

variable "board_viewers" {
  description = "Who may open the board (roles/run.invoker on it): IAM members such as user:sre@example.com, group:sre@example.com or serviceAccount:.... Never public."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.board_viewers : can(regex("^(user|group|serviceAccount|domain):.+$", m))])
    error_message = "board_viewers must be IAM members (user:..., group:..., serviceAccount:..., domain:...): the board is private, never public."
  }
}

variable "drain" {
  description = <<-EOT
    The load-balancer drainer. backends: the unmanaged instance groups (type "instance_group") or
    zonal NEGs (type "network_endpoint_group", with the endpoint port) the fleet's VMs belong to;
    they bound the function's IAM (a custom role, granted only on these resources and on instances
    in their zones). metadata_key: optional instance metadata key naming a VM's own backends
    ("instanceGroups/NAME" or "networkEndpointGroups/NAME:PORT"); needs compute.instances.get.
  EOT
  type = object({
    enabled = optional(bool, true)
    backends = optional(list(object({
      type = optional(string, "instance_group")
      zone = string
      name = string
      port = optional(number)
    })), [])
    metadata_key = optional(string, "")
    kinds        = optional(list(string), [])
    attributes   = optional(map(list(string)), {})
  })
  default = {}

  validation {
    condition     = alltrue([for k in var.drain.kinds : contains(local.kinds, k)])
    error_message = "drain.kinds must list event kinds the bridge emits, e.g. maintenance.started."
  }
  validation {
    condition     = alltrue([for a, v in var.drain.attributes : can(regex("^ce-[a-z0-9]{1,20}$", a)) && length(v) > 0])
    error_message = "drain.attributes keys must be ce-* attribute names (e.g. ce-zone), each with at least one value."
  }

  validation {
    condition     = alltrue([for b in var.drain.backends : contains(["instance_group", "network_endpoint_group"], b.type)])
    error_message = "drain.backends[*].type must be \"instance_group\" or \"network_endpoint_group\"."
  }
  validation {
    condition     = alltrue([for b in var.drain.backends : can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", b.zone))])
    error_message = "drain.backends[*].zone must be a zone name such as us-central1-a."
  }
  validation {
    condition     = var.drain.metadata_key == "" || can(regex("^[a-zA-Z0-9_-]{1,128}$", var.drain.metadata_key))
    error_message = "drain.metadata_key must be a metadata key (letters, digits, _ and -)."
  }
}

# --- BigQuery history -------------------------------------------------------------------------

variable "bigquery_history" {
  description = "Optional BigQuery subscription that writes every event (data, attributes and Pub/Sub metadata) to a day-partitioned table: the fleet's maintenance history."
  type = object({
    enabled             = optional(bool, false)
    dataset_id          = optional(string, "maintenance_bridge")
    table_id            = optional(string, "events")
    location            = optional(string, "US")
    deletion_protection = optional(bool, true)
  })
  default = {}

  validation {
    condition     = can(regex("^[a-zA-Z0-9_]+$", var.bigquery_history.dataset_id)) && length(var.bigquery_history.dataset_id) <= 1024 && can(regex("^[a-zA-Z0-9_]+$", var.bigquery_history.table_id)) && length(var.bigquery_history.table_id) <= 1024
    error_message = "bigquery_history.dataset_id and table_id may contain letters, digits and underscores only."
  }
}

# --- example VM -------------------------------------------------------------------------------

variable "example_instance_template" {
  description = "An instance template for a VM that runs the bridge as the publisher service account (no VM is created). What it installs is always verified by sha256: bridge_wheel (local path; default: the one wheel scripts/build-release left in dist/), uploaded to the module's bucket, or bridge_package (maintenance-bridge==VERSION from the package index) with bridge_package_hashes. wheelhouse: local path of scripts/build-release's wheelhouse.tar.gz, for VMs that reach no package index. ops_agent: install the Ops Agent and deploy/ops-agent/config.yaml. bridge_settings: extra BRIDGE_* settings of the service (the template already sets the topic, metrics on 127.0.0.1:8799 and BRIDGE_HEARTBEAT_INTERVAL=60)."
  type = object({
    enabled               = optional(bool, true)
    machine_type          = optional(string, "e2-small")
    source_image          = optional(string, "debian-cloud/debian-12")
    network               = optional(string, "default")
    subnetwork            = optional(string)
    bridge_wheel          = optional(string)
    bridge_package        = optional(string)
    bridge_package_hashes = optional(list(string), [])
    wheelhouse            = optional(string)
    ops_agent             = optional(bool, true)
    boot_disk_kms         = optional(string)
    bridge_settings       = optional(map(string), {})
  })
  default = {}

  validation {
    condition     = can(regex("^[a-z0-9-]+$", var.example_instance_template.machine_type))
    error_message = "example_instance_template.machine_type must be a machine type name such as e2-small."
  }
  validation {
    condition     = lookup(var.example_instance_template.bridge_settings, "BRIDGE_PUBSUB_TRANSPORT", "rest") != "grpc"
    error_message = "example_instance_template installs maintenance-bridge without its [grpc] extra (REST transport only): BRIDGE_PUBSUB_TRANSPORT = \"grpc\" would stop the bridge at start."
  }
  validation {
    condition     = alltrue([for k, v in var.example_instance_template.bridge_settings : can(regex("^BRIDGE_[A-Z0-9_]+$", k)) && !can(regex("['\n]", v))])
    error_message = "example_instance_template.bridge_settings keys must be BRIDGE_* names; values may not contain quotes or newlines."
  }
  validation {
    condition     = var.example_instance_template.bridge_package == null || can(regex("^maintenance-bridge==[0-9][A-Za-z0-9.+!-]*$", coalesce(var.example_instance_template.bridge_package, "-")))
    error_message = "example_instance_template.bridge_package must be pinned: maintenance-bridge==VERSION."
  }
  validation {
    condition     = (var.example_instance_template.bridge_package == null) == (length(var.example_instance_template.bridge_package_hashes) == 0) && alltrue([for h in var.example_instance_template.bridge_package_hashes : can(regex("^[0-9a-f]{64}$", h))])
    error_message = "example_instance_template.bridge_package_hashes: the sha256 (64 hex digits) of each file of bridge_package pip may pick, given exactly when bridge_package is."
  }
  validation {
    condition     = var.example_instance_template.bridge_package == null || var.example_instance_template.bridge_wheel == null
    error_message = "example_instance_template: set bridge_wheel or bridge_package, not both."
  }
  validation {
    condition     = var.example_instance_template.bridge_wheel == null || can(regex("^[^'\n]*maintenance_bridge-[^/'\n]+\\.whl$", coalesce(var.example_instance_template.bridge_wheel, "-")))
    error_message = "example_instance_template.bridge_wheel must be the local path of a maintenance_bridge-*.whl (scripts/build-release)."
  }
  validation {
    condition     = var.example_instance_template.wheelhouse == null || can(regex("^[^'\n]+\\.tar\\.gz$", coalesce(var.example_instance_template.wheelhouse, "-")))
    error_message = "example_instance_template.wheelhouse must be the local path of a .tar.gz (scripts/build-release --wheelhouse)."
  }
}

# --- monitoring -------------------------------------------------------------------------------

variable "monitoring" {
  description = "Alert policies and a dashboard on the bridges' metrics (scraped by the Ops Agent, see deploy/ops-agent/config.yaml) and the dead-letter subscription: bridge silent (no heartbeat for silence_minutes on a running VM that reported in the last 24 h), no metadata answer for 5 minutes, outbox oldest event older than outbox_max_age_seconds, publish failures, dead letters waiting. notification_channels: ids (projects/P/notificationChannels/N) alerts go to."
  type = object({
    enabled                = optional(bool, true)
    notification_channels  = optional(list(string), [])
    silence_minutes        = optional(number, 10)
    outbox_max_age_seconds = optional(number, 120)
    dead_letter_threshold  = optional(number, 0)
  })
  default = {}

  validation {
    condition     = var.monitoring.silence_minutes >= 3 && var.monitoring.outbox_max_age_seconds >= 30 && var.monitoring.dead_letter_threshold >= 0
    error_message = "monitoring: silence_minutes >= 3 (heartbeats every 60 s, scrapes every 30 s), outbox_max_age_seconds >= 30, dead_letter_threshold >= 0."
  }
  validation {
    condition     = alltrue([for c in var.monitoring.notification_channels : can(regex("^projects/[^/]+/notificationChannels/[0-9]+$", c))])
    error_message = "monitoring.notification_channels must be notification channel ids: projects/P/notificationChannels/N."
  }
}

# --- the cloud's side: system-event audit logs ------------------------------------------------

variable "system_events" {
  description = "Compute Engine's system-event audit logs (host errors, preemptions, migrations, ...) routed by a log sink to a topic of their own and published by the system-events function on the main topic as CloudEvents. scope: \"project\" (the module's project), \"folder\" (folder_id) or \"organization\" (organization_id), with include_children for the last two: one sink for a fleet across projects. max_instances: of the function."
  type = object({
    enabled          = optional(bool, true)
    scope            = optional(string, "project")
    folder_id        = optional(string)
    organization_id  = optional(string)
    include_children = optional(bool, true)
    max_instances    = optional(number, 5)
  })
  default = {}

  validation {
    condition     = contains(["project", "folder", "organization"], var.system_events.scope)
    error_message = "system_events.scope must be \"project\", \"folder\" or \"organization\"."
  }
  validation {
    condition     = var.system_events.scope != "folder" || can(regex("^(folders/)?[0-9]+$", coalesce(var.system_events.folder_id, "-")))
    error_message = "system_events.scope = \"folder\" needs folder_id: the numeric id, or folders/ID."
  }
  validation {
    condition     = var.system_events.scope != "organization" || can(regex("^[0-9]+$", coalesce(var.system_events.organization_id, "-")))
    error_message = "system_events.scope = \"organization\" needs organization_id: the numeric id."
  }
  validation {
    condition     = var.system_events.max_instances >= 1 && floor(var.system_events.max_instances) == var.system_events.max_instances
    error_message = "system_events.max_instances must be a positive integer."
  }
}

# --- autopilot (autopilot.tf, docs/autopilot.md) ----------------------------------------------

variable "enable_autopilot" {
  description = "Deploy the autopilot: a function Cloud Scheduler calls every autopilot_schedule that starts reschedulable scheduled maintenance early (instances.performMaintenance) when autopilot_policy allows it. Needs ledger.enabled."
  type        = bool
  default     = false
}

variable "autopilot_policy" {
  description = "The autopilot's policy, rendered to JSON in AUTOPILOT_POLICY (docs/autopilot.md): windows (days mon..sun, start/end HH:MM wall-clock in time_zone, DST-safe; end <= start runs overnight), max_per_zone (instances in maintenance at once per zone, counting those in maintenance for any reason), deadline_margin_hours (act outside the windows once latestWindowStartTime is that close), group_by (\"name_prefix\", \"mig\" or \"label:KEY\": never two of a group at once), leave_alone (instance name patterns), leave_alone_label (KEY=VALUE), pre_hook_url (POSTed before each start; a 2xx lets it go), dry_run."
  type = object({
    windows = optional(list(object({
      days      = list(string)
      start     = string
      end       = string
      time_zone = optional(string, "UTC")
    })), [])
    max_per_zone          = optional(number, 1)
    deadline_margin_hours = optional(number, 24)
    group_by              = optional(string, "")
    leave_alone           = optional(list(string), [])
    leave_alone_label     = optional(string, "")
    pre_hook_url          = optional(string, "")
    dry_run               = optional(bool, false)
  })
  default = {}

  validation {
    condition     = alltrue([for w in var.autopilot_policy.windows : length(w.days) > 0 && alltrue([for d in w.days : contains(["mon", "tue", "wed", "thu", "fri", "sat", "sun"], d)])])
    error_message = "autopilot_policy.windows[*].days must list some of mon, tue, wed, thu, fri, sat, sun."
  }
  validation {
    condition     = alltrue([for w in var.autopilot_policy.windows : can(regex("^([01][0-9]|2[0-3]):[0-5][0-9]$", w.start)) && can(regex("^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$", w.end))])
    error_message = "autopilot_policy.windows[*].start and end must be HH:MM (end may be 24:00)."
  }
  validation {
    condition     = alltrue([for w in var.autopilot_policy.windows : can(regex("^(UTC|[A-Za-z_]+(/[A-Za-z0-9_+-]+)+)$", w.time_zone))])
    error_message = "autopilot_policy.windows[*].time_zone must be an IANA time zone such as Europe/Berlin."
  }
  validation {
    condition     = var.autopilot_policy.max_per_zone >= 1 && floor(var.autopilot_policy.max_per_zone) == var.autopilot_policy.max_per_zone && var.autopilot_policy.deadline_margin_hours >= 0
    error_message = "autopilot_policy: max_per_zone must be an integer >= 1, deadline_margin_hours >= 0."
  }
  validation {
    condition     = can(regex("^(|name_prefix|mig|label:.+)$", var.autopilot_policy.group_by)) && can(regex("^(|[^=]+=.*)$", var.autopilot_policy.leave_alone_label))
    error_message = "autopilot_policy: group_by must be \"\", \"name_prefix\", \"mig\" or \"label:KEY\"; leave_alone_label KEY=VALUE."
  }
  validation {
    condition     = can(regex("^(|https?://.+)$", var.autopilot_policy.pre_hook_url))
    error_message = "autopilot_policy.pre_hook_url must be an http(s) URL."
  }
}

variable "autopilot_schedule" {
  description = "How often the autopilot ticks: a cron schedule (UTC) for Cloud Scheduler."
  type        = string
  default     = "*/5 * * * *"

  validation {
    condition     = length(split(" ", trimspace(var.autopilot_schedule))) == 5
    error_message = "autopilot_schedule must be a five-field cron schedule, e.g. \"*/5 * * * *\"."
  }
}

variable "autopilot_operators" {
  description = "IAM members given roles/run.invoker on the autopilot, to call it by hand (a dry run: ?dry_run=true); the scheduler's own account is always one."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.autopilot_operators : can(regex("^(user|group|serviceAccount|domain):.+$", m))])
    error_message = "autopilot_operators must be IAM members: user:, group:, serviceAccount: or domain:."
  }
}
