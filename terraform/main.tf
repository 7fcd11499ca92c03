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
    { for fn, sub in google_pubsub_subscription.system_events_push : fn => sub.name }, # system_events.tf
  )
}

resource "google_project_service" "apis" {
  for_each = var.enable_apis ? local.apis : toset([])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

# --- topic, schema, dead letters --------------------------------------------------------------

# With a customer-managed key, Pub/Sub's service agent encrypts and decrypts the topics' messages;
# a topic created before this grant exists fails to create.
resource "google_kms_crypto_key_iam_member" "pubsub_agent" {
  count = var.kms_key_name == null ? 0 : 1

  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = local.pubsub_agent

  depends_on = [google_project_service.apis]
}

# The type is in the name: switching topic_schema_type creates the new schema, points the topic
# at it, then deletes the old one.
resource "google_pubsub_schema" "event_data" {
  count = var.attach_schema ? 1 : 0

  project = var.project_id
  name    = "${var.name}-event-data-v1-${var.topic_schema_type}"
  type    = var.topic_schema_type == "avro" ? "AVRO" : "PROTOCOL_BUFFER"
  definition = (var.topic_schema_type == "avro"
    ? file("${path.module}/../schemas/v1/event-data.avsc")
  : file("${path.module}/../schemas/v1/event-data.proto"))

  lifecycle {
    create_before_destroy = true
  }

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

  depends_on = [google_project_service.apis, google_kms_crypto_key_iam_member.pubsub_agent]
}

resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83:CMEK is opt-in through var.kms_key_name; Google-managed encryption is the default.
  project                    = var.project_id
  name                       = "${local.topic_name}-dead-letter"
  labels                     = local.labels
  message_retention_duration = var.dead_letter_retention_duration
  kms_key_name               = var.kms_key_name

  depends_on = [google_project_service.apis, google_kms_crypto_key_iam_member.pubsub_agent]
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

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = local.delivering_subscriptions

  project      = var.project_id
  subscription = each.value
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent

  depends_on = [google_project_service.apis]
}

# --- publishers (the VMs) ---------------------------------------------------------------------

resource "google_service_account" "publisher" {
  count = var.create_publisher_service_account ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name}-pub"
  display_name = "maintenance-bridge publisher"
  description  = "Runs the bridge on VMs; may publish to ${local.topic_name} and nothing else."

  depends_on = [google_project_service.apis]
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
  # checkov:skip=CKV_GCP_62:Access logs of a bucket that only Cloud Build and the example VMs read add a second bucket to secure and no signal.
  # Also holds the bridge's wheel for the example VMs (vm.tf).
  count = local.any_function || length(local.vm_artifacts) > 0 ? 1 : 0

  project                     = var.project_id
  name                        = local.artifact_bucket
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
# subscriber decodes exactly what the bridge encodes. The file list is functions/archive.json,
# which tests/test_functions.py builds its zips from too: what is tested is what is deployed.
data "archive_file" "function" {
  for_each = local.function_archives

  type             = "zip"
  output_path      = "${path.module}/.build/${each.key}.zip"
  output_file_mode = "0644"

  dynamic "source" {
    for_each = merge(jsondecode(file("${path.module}/functions/archive.json")).files, lookup(jsondecode(file("${path.module}/functions/archive.json")).only, each.key, {}))
    content {
      content  = file("${path.module}/${replace(source.value, "{function}", each.key)}")
      filename = source.key
    }
  }
}

resource "google_storage_bucket_object" "function" {
  for_each = local.function_archives

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

  depends_on = [google_project_service.apis]
}

# The identity Eventarc / the push subscriptions use to invoke the functions: run.invoker on
# these functions only.
resource "google_service_account" "invoker" {
  count = local.any_function ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name}-invoker"
  display_name = "maintenance-bridge trigger"
  description  = "Invokes the maintenance-bridge example functions on behalf of Eventarc / Pub/Sub push."

  depends_on = [google_project_service.apis]
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

  depends_on = [google_project_service.apis]
}

# Cloud Build builds the functions as this account, with only what a build needs (Google's list
# for a custom build service account): write build logs, push the image to the module's own
# repository, read the source bucket. Many organisations strip the default build account.
resource "google_service_account" "build" {
  count = local.any_function ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name}-build"
  display_name = "maintenance-bridge function builds"
  description  = "Cloud Build identity of the maintenance-bridge example functions."

  depends_on = [google_project_service.apis]
}

resource "google_artifact_registry_repository" "functions" {
  # checkov:skip=CKV_GCP_84:The repository holds build images of the public example functions; a key would protect nothing secret.
  count = local.any_function ? 1 : 0

  project       = var.project_id
  location      = var.region
  repository_id = "${var.name}-functions"
  format        = "DOCKER"
  description   = "Images Cloud Build makes of the maintenance-bridge example functions."
  labels        = local.labels

  # Every deploy adds an image; the newest few cover the live revisions and a rollback.
  cleanup_policies {
    id     = "keep-newest"
    action = "KEEP"
    most_recent_versions {
      keep_count = 5
    }
  }
  cleanup_policies {
    id     = "delete-older"
    action = "DELETE"
    condition {
      older_than = "2592000s"
    }
  }

  depends_on = [google_project_service.apis]
}

# Logs can only be written project-wide; logWriter grants nothing else.
resource "google_project_iam_member" "build_logs" {
  count = local.any_function ? 1 : 0

  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = "serviceAccount:${google_service_account.build[0].email}"
}

resource "google_artifact_registry_repository_iam_member" "build" {
  count = local.any_function ? 1 : 0

  project    = var.project_id
  location   = var.region
  repository = google_artifact_registry_repository.functions[0].name
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.build[0].email}"
}

resource "google_storage_bucket_iam_member" "build_source" {
  count = local.any_function ? 1 : 0

  bucket = google_storage_bucket.functions_source[0].name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.build[0].email}"
}

# New IAM grants take a while to reach every Google service; a build started at once can be
# refused. Google's own example for a custom build account waits 60 s the same way.
resource "time_sleep" "build_grants" {
  count = local.any_function ? 1 : 0

  create_duration = "60s"

  depends_on = [
    google_project_iam_member.build_logs,
    google_artifact_registry_repository_iam_member.build,
    google_storage_bucket_iam_member.build_source,
  ]
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

  depends_on = [google_project_service.apis]
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
    runtime           = "python312"
    entry_point       = "handle"
    service_account   = google_service_account.build[0].id
    docker_repository = google_artifact_registry_repository.functions[0].id
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

  # The first build runs as soon as the function is created: its grants must be in effect.
  depends_on = [google_project_service.apis, time_sleep.build_grants]
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

  depends_on = [google_project_service.apis]
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
