# maintenance-bridge: the topic the on-VM bridge publishes to, its safety nets (schema, dead
# letters), publisher IAM scoped to the topic, and example subscribers as Cloud Functions (gen2).
# See README.md for the walk-through and the reasoning behind each choice.

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  # Google-managed identity that delivers messages, dead-letters them and mints push tokens.
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  # Static keys (so for_each works before the created account's email is known).
  publishers = merge(
    { for email in var.publisher_service_account_emails : email => email },
    var.create_publisher_service_account ? { created = google_service_account.publisher[0].email } : {},
  )
  vm_service_account = var.create_publisher_service_account ? try(google_service_account.publisher[0].email, null) : try(var.publisher_service_account_emails[0], null)

  # The created secret's attribute when there is one, so that the grant waits for the secret.
  notify_secret = try(google_secret_manager_secret.webhook[0].secret_id, local.notify_secret_id)

  # Every subscription this module creates that delivers somewhere (the dead-letter sink excluded).
  delivering_subscriptions = merge(
    { for fn, sub in google_pubsub_subscription.push : fn => sub.name },
    var.bigquery_history.enabled ? { bigquery = google_pubsub_subscription.bigquery[0].name } : {},
  )
}

resource "google_project_service" "apis" {
  for_each = var.enable_apis ? local.apis : toset([])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

# --- topic, schema, dead letters --------------------------------------------------------------

resource "google_pubsub_schema" "event_data" {
  count = var.attach_schema ? 1 : 0

  project    = var.project_id
  name       = "${var.name}-event-data-v1"
  type       = "PROTOCOL_BUFFER"
  definition = file("${path.module}/../schemas/v1/event-data.proto")

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "events" {
  # checkov:skip=CKV_GCP_83:CMEK is opt-in through var.kms_key_name; Google-managed encryption is the default.
  project                    = var.project_id
  name                       = local.topic_name
  labels                     = local.labels
  message_retention_duration = var.message_retention_duration
  kms_key_name               = var.kms_key_name

  dynamic "schema_settings" {
    for_each = var.attach_schema ? [1] : []
    content {
      schema   = google_pubsub_schema.event_data[0].id
      encoding = "JSON"
    }
  }

  lifecycle {
    precondition {
      condition     = var.create_publisher_service_account || length(var.publisher_service_account_emails) > 0
      error_message = "No publisher: set create_publisher_service_account = true or list publisher_service_account_emails."
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83:CMEK is opt-in through var.kms_key_name; Google-managed encryption is the default.
  project                    = var.project_id
  name                       = "${local.topic_name}-dead-letter"
  labels                     = local.labels
  message_retention_duration = var.dead_letter_retention_duration
  kms_key_name               = var.kms_key_name

  depends_on = [google_project_service.apis]
}

# Where dead letters wait to be inspected (`gcloud pubsub subscriptions pull`). It is the end of
# the line, so it has no dead-letter policy of its own.
resource "google_pubsub_subscription" "dead_letter" {
  project                    = var.project_id
  name                       = "${local.topic_name}-dead-letter"
  topic                      = google_pubsub_topic.dead_letter.id
  labels                     = local.labels
  ack_deadline_seconds       = 60
  message_retention_duration = var.dead_letter_retention_duration

  expiration_policy {
    ttl = ""
  }
}

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  project = var.project_id
  topic   = google_pubsub_topic.dead_letter.name
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = local.delivering_subscriptions

  project      = var.project_id
  subscription = each.value
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# --- publishers (the VMs) ---------------------------------------------------------------------

resource "google_service_account" "publisher" {
  count = var.create_publisher_service_account ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name}-pub"
  display_name = "maintenance-bridge publisher"
  description  = "Runs the bridge on VMs; may publish to ${local.topic_name} and nothing else."
}

# Topic-scoped on purpose: roles/pubsub.publisher on the project would let a VM publish to every
# topic in it.
resource "google_pubsub_topic_iam_member" "publisher" {
  for_each = local.publishers

  project = var.project_id
  topic   = google_pubsub_topic.events.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${each.value}"
}

# --- example subscribers: source ---------------------------------------------------------------

resource "google_storage_bucket" "functions_source" {
  # checkov:skip=CKV_GCP_62:Access logs of a bucket that only Cloud Build reads add a second bucket to secure and no signal.
  count = local.any_function ? 1 : 0

  project                     = var.project_id
  name                        = "${var.project_id}-${var.name}-src"
  location                    = coalesce(var.functions_source_location, var.region)
  labels                      = local.labels
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  # Each deploy writes a new object (its name carries the zip's hash); keep a few old ones.
  lifecycle_rule {
    condition {
      num_newer_versions = 3
      with_state         = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 30
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

# Each zip vendors the project's one decoder (bridge/events.py) next to the function, so every
# subscriber decodes exactly what the bridge encodes.
data "archive_file" "function" {
  for_each = local.functions

  type             = "zip"
  output_path      = "${path.module}/.build/${each.key}.zip"
  output_file_mode = "0644"

  source {
    content  = file("${path.module}/functions/${each.key}/main.py")
    filename = "main.py"
  }
  source {
    content  = file("${path.module}/functions/${each.key}/requirements.txt")
    filename = "requirements.txt"
  }
  source {
    content  = file("${path.module}/functions/_shared/subscriber.py")
    filename = "subscriber.py"
  }
  source {
    content  = file("${path.module}/../bridge/__init__.py")
    filename = "bridge/__init__.py"
  }
  source {
    content  = file("${path.module}/../bridge/events.py")
    filename = "bridge/events.py"
  }
}

resource "google_storage_bucket_object" "function" {
  for_each = local.functions

  bucket = google_storage_bucket.functions_source[0].name
  name   = "${each.key}-${data.archive_file.function[each.key].output_md5}.zip"
  source = data.archive_file.function[each.key].output_path
}

# --- example subscribers: identities and least privilege ---------------------------------------

resource "google_service_account" "function" {
  for_each = local.functions

  project      = var.project_id
  account_id   = "${var.name}-${each.key}"
  display_name = "maintenance-bridge ${each.key} function"
  description  = "Runtime identity of the ${each.key} example subscriber."
}

# The identity Eventarc / the push subscriptions use to invoke the functions: run.invoker on
# these functions only.
resource "google_service_account" "invoker" {
  count = local.any_function ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name}-invoker"
  display_name = "maintenance-bridge trigger"
  description  = "Invokes the maintenance-bridge example functions on behalf of Eventarc / Pub/Sub push."
}

resource "google_cloud_run_v2_service_iam_member" "invoker" {
  for_each = local.functions

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.function[each.key].name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.invoker[0].email}"
}

# Pub/Sub mints the OIDC tokens of authenticated pushes (and of Eventarc's push) as the invoker.
resource "google_service_account_iam_member" "invoker_token_creator" {
  count = local.any_function ? 1 : 0

  service_account_id = google_service_account.invoker[0].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent
}

# notify: read one secret.
resource "google_secret_manager_secret" "webhook" {
  count = var.notify.enabled && var.notify.webhook_secret_id == null ? 1 : 0

  project   = var.project_id
  secret_id = "${var.name}-chat-webhook"
  labels    = local.labels

  replication {
    auto {}
  }

  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_iam_member" "notify" {
  count = var.notify.enabled ? 1 : 0

  project   = var.project_id
  secret_id = local.notify_secret
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.function["notify"].email}"
}

# ledger: Firestore read/write, limited by an IAM condition to its one database.
resource "google_project_iam_member" "ledger" {
  count = var.ledger.enabled ? 1 : 0

  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.function["ledger"].email}"

  condition {
    title       = "maintenance-bridge-ledger-database"
    description = "Only the ledger's Firestore database."
    expression  = "resource.name == \"projects/${var.project_id}/databases/${var.ledger.database}\""
  }
}

# drain: no predefined role is narrow enough (compute.instanceAdmin would let it delete VMs), so
# a custom role with the membership permissions only, granted under a condition that names the
# configured backends and the instances in their zones.
resource "google_project_iam_custom_role" "drain" {
  count = var.drain.enabled && length(local.drain_backends) > 0 ? 1 : 0

  project     = var.project_id
  role_id     = replace("${var.name}_drain", "-", "_")
  title       = "maintenance-bridge drain"
  description = "Add/remove instances to/from instance groups and NEGs, nothing else."
  permissions = concat(
    ["compute.instances.use"],
    anytrue([for b in local.drain_backends : b.type == "instance_group"]) ? ["compute.instanceGroups.update"] : [],
    anytrue([for b in local.drain_backends : b.type == "network_endpoint_group"]) ? [
      "compute.networkEndpointGroups.attachNetworkEndpoints",
      "compute.networkEndpointGroups.detachNetworkEndpoints",
    ] : [],
    var.drain.metadata_key != "" ? ["compute.instances.get"] : [],
  )
}

resource "google_project_iam_member" "drain" {
  count = var.drain.enabled && length(local.drain_backends) > 0 ? 1 : 0

  project = var.project_id
  role    = google_project_iam_custom_role.drain[0].id
  member  = "serviceAccount:${google_service_account.function["drain"].email}"

  condition {
    title       = "maintenance-bridge-drain-backends"
    description = "Only the configured backends and the instances in their zones."
    expression = join(" || ", concat(
      [
        for b in local.drain_backends :
        "resource.name == \"projects/${var.project_id}/zones/${b.zone}/${b.type == "instance_group" ? "instanceGroups" : "networkEndpointGroups"}/${b.name}\""
      ],
      [for z in local.drain_zones : "resource.name.startsWith(\"projects/${var.project_id}/zones/${z}/instances/\")"],
    ))
  }
}

# --- example subscribers: the functions ---------------------------------------------------------

resource "google_cloudfunctions2_function" "function" {
  for_each = local.functions

  project     = var.project_id
  location    = var.region
  name        = "${var.name}-${each.key}"
  description = each.value.description
  labels      = local.labels

  build_config {
    runtime     = "python312"
    entry_point = "handle"
    source {
      storage_source {
        bucket = google_storage_bucket.functions_source[0].name
        object = google_storage_bucket_object.function[each.key].name
      }
    }
  }

  service_config {
    available_memory                 = "256M"
    timeout_seconds                  = 60
    max_instance_count               = each.value.max_instances
    max_instance_request_concurrency = 1
    # Eventarc and Pub/Sub push count as internal traffic: nothing else can reach the functions.
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.function[each.key].email
    environment_variables          = each.value.env
  }

  dynamic "event_trigger" {
    for_each = var.function_delivery == "eventarc" ? [1] : []
    content {
      trigger_region        = var.region
      event_type            = "google.cloud.pubsub.topic.v1.messagePublished"
      pubsub_topic          = google_pubsub_topic.events.id
      retry_policy          = "RETRY_POLICY_RETRY"
      service_account_email = google_service_account.invoker[0].email
    }
  }

  lifecycle {
    precondition {
      condition     = each.key != "drain" || var.drain.metadata_key == "" || length(local.drain_backends) > 0
      error_message = "drain.metadata_key needs drain.backends: they bound the function's IAM."
    }
  }

  depends_on = [google_project_service.apis]
}

# function_delivery = "push": our own subscription per function, so that Pub/Sub filters on
# attributes, dead-letters poison messages and backs off between retries.
resource "google_pubsub_subscription" "push" {
  for_each = var.function_delivery == "push" ? local.functions : {}

  project                    = var.project_id
  name                       = "${var.name}-${each.key}"
  topic                      = google_pubsub_topic.events.id
  labels                     = local.labels
  filter                     = local.filter_expressions[each.key]
  ack_deadline_seconds       = 60
  message_retention_duration = "86400s"

  push_config {
    push_endpoint = google_cloudfunctions2_function.function[each.key].service_config[0].uri
    oidc_token {
      service_account_email = google_service_account.invoker[0].email
      audience              = google_cloudfunctions2_function.function[each.key].service_config[0].uri
    }
  }

  retry_policy {
    minimum_backoff = "5s"
    maximum_backoff = "300s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = ""
  }

  lifecycle {
    precondition {
      condition     = length(local.filter_expressions[each.key]) <= 256
      error_message = "The ${each.key} attribute filter is longer than Pub/Sub's 256 bytes: list fewer kinds/values."
    }
  }

  depends_on = [google_pubsub_topic_iam_member.dead_letter_publisher]
}

# --- optional BigQuery history ------------------------------------------------------------------

resource "google_bigquery_dataset" "history" {
  # checkov:skip=CKV_GCP_81:CMEK would need a key in the dataset's location; Google-managed encryption is the default here.
  count = var.bigquery_history.enabled ? 1 : 0

  project     = var.project_id
  dataset_id  = var.bigquery_history.dataset_id
  location    = var.bigquery_history.location
  description = "Maintenance events of the fleet, written by a Pub/Sub BigQuery subscription."
  labels      = local.labels

  depends_on = [google_project_service.apis]
}

resource "google_bigquery_table" "history" {
  # checkov:skip=CKV_GCP_80:CMEK would need a key in the dataset's location; Google-managed encryption is the default here.
  count = var.bigquery_history.enabled ? 1 : 0

  project             = var.project_id
  dataset_id          = google_bigquery_dataset.history[0].dataset_id
  table_id            = var.bigquery_history.table_id
  description         = "One row per event: payload (data), CloudEvents attributes (attributes, JSON text) and Pub/Sub metadata."
  labels              = local.labels
  deletion_protection = var.bigquery_history.deletion_protection

  time_partitioning {
    type  = "DAY"
    field = "publish_time"
  }

  # The columns write_metadata fills, plus the payload.
  schema = jsonencode([
    { name = "subscription_name", type = "STRING", mode = "NULLABLE", description = "Pub/Sub subscription" },
    { name = "message_id", type = "STRING", mode = "NULLABLE", description = "Pub/Sub message id" },
    { name = "publish_time", type = "TIMESTAMP", mode = "NULLABLE", description = "Pub/Sub publish time" },
    { name = "attributes", type = "STRING", mode = "NULLABLE", description = "Message attributes (ce-*), JSON" },
    { name = "data", type = "STRING", mode = "NULLABLE", description = "Event data, JSON" },
  ])
}

resource "google_bigquery_table_iam_member" "history_writer" {
  count = var.bigquery_history.enabled ? 1 : 0

  project    = var.project_id
  dataset_id = google_bigquery_table.history[0].dataset_id
  table_id   = google_bigquery_table.history[0].table_id
  role       = "roles/bigquery.dataEditor"
  member     = local.pubsub_agent
}

resource "google_pubsub_subscription" "bigquery" {
  count = var.bigquery_history.enabled ? 1 : 0

  project = var.project_id
  name    = "${var.name}-bigquery-history"
  topic   = google_pubsub_topic.events.id
  labels  = local.labels

  bigquery_config {
    table          = "${var.project_id}.${google_bigquery_table.history[0].dataset_id}.${google_bigquery_table.history[0].table_id}"
    write_metadata = true
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = ""
  }

  depends_on = [
    google_bigquery_table_iam_member.history_writer,
    google_pubsub_topic_iam_member.dead_letter_publisher,
  ]
}

# --- example VM ---------------------------------------------------------------------------------

resource "google_compute_instance_template" "bridge" {
  count = var.example_instance_template.enabled ? 1 : 0

  project        = var.project_id
  region         = var.region
  name_prefix    = "${var.name}-"
  description    = "A VM that runs maintenance-bridge as the publisher service account."
  machine_type   = var.example_instance_template.machine_type
  labels         = local.labels
  tags           = ["maintenance-bridge"]
  can_ip_forward = false

  disk {
    source_image = var.example_instance_template.source_image
    boot         = true
    auto_delete  = true
    disk_size_gb = 10

    dynamic "disk_encryption_key" {
      for_each = var.example_instance_template.boot_disk_kms != null ? [var.example_instance_template.boot_disk_kms] : []
      content {
        kms_key_self_link = disk_encryption_key.value
      }
    }
  }

  # No external IP: pip needs Cloud NAT (or a mirror) on the subnetwork. See README.
  network_interface {
    network    = var.example_instance_template.subnetwork == null ? var.example_instance_template.network : null
    subnetwork = var.example_instance_template.subnetwork
  }

  service_account {
    email  = local.vm_service_account
    scopes = ["https://www.googleapis.com/auth/cloud-platform"]
  }

  scheduling {
    on_host_maintenance = "MIGRATE"
    automatic_restart   = true
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    block-project-ssh-keys = "true"
    enable-oslogin         = "TRUE"
    serial-port-enable     = "false"
    startup-script         = local.startup_script
  }

  lifecycle {
    create_before_destroy = true
  }

  depends_on = [google_project_service.apis]
}
