# The cloud's side (docs/events.md, "The cloud's events"): Compute Engine writes every disruption
# of every VM to Cloud Logging as a System Event audit log entry, including what no bridge can
# tell (a host error, a preemption whose 30 s ran out, a VM without a bridge). A log sink routes
# those entries to a topic of their own; the system-events function turns each into one event of
# the contract on the main topic, beside the bridges' events. Behind var.system_events.enabled,
# on by default; the sink is the project's unless var.system_events.scope names a folder or an
# organization (entries stay project-scoped, so one sink covers a fleet across projects).

# From the variables alone (tests/test_board.py evaluates it with `terraform console`).
locals {
  system_events = var.system_events.enabled ? { "system-events" = var.system_events } : {}
  system_events_filter = join(" AND ", [
    "log_id(\"cloudaudit.googleapis.com/system_event\")",
    "resource.type=\"gce_instance\"",
    "protoPayload.serviceName=\"compute.googleapis.com\"",
  ])
}

locals {
  # Whichever sink exists: its writer identity is the only publisher of the log topic.
  system_events_writer = one(concat(
    google_logging_project_sink.system_events[*].writer_identity,
    google_logging_folder_sink.system_events[*].writer_identity,
    google_logging_organization_sink.system_events[*].writer_identity,
  ))
}

resource "google_pubsub_topic" "system_events" {
  # checkov:skip=CKV_GCP_83:CMEK is opt-in through var.kms_key_name; Google-managed encryption is the default.
  count = var.system_events.enabled ? 1 : 0

  project                    = var.project_id
  name                       = "${local.topic_name}-system-events"
  labels                     = local.labels
  message_retention_duration = var.message_retention_duration
  kms_key_name               = var.kms_key_name

  depends_on = [google_project_service.apis, google_kms_crypto_key_iam_member.pubsub_agent]
}

resource "google_logging_project_sink" "system_events" {
  count = var.system_events.enabled && var.system_events.scope == "project" ? 1 : 0

  project                = var.project_id
  name                   = "${var.name}-system-events"
  description            = "Compute Engine system events of the project's instances, to the system-events function."
  destination            = "pubsub.googleapis.com/${google_pubsub_topic.system_events[0].id}"
  filter                 = local.system_events_filter
  unique_writer_identity = true
}

resource "google_logging_folder_sink" "system_events" {
  count = var.system_events.enabled && var.system_events.scope == "folder" ? 1 : 0

  folder           = var.system_events.folder_id
  name             = "${var.name}-system-events"
  description      = "Compute Engine system events of the folder's instances, to the system-events function."
  destination      = "pubsub.googleapis.com/${google_pubsub_topic.system_events[0].id}"
  filter           = local.system_events_filter
  include_children = var.system_events.include_children
}

resource "google_logging_organization_sink" "system_events" {
  count = var.system_events.enabled && var.system_events.scope == "organization" ? 1 : 0

  org_id           = var.system_events.organization_id
  name             = "${var.name}-system-events"
  description      = "Compute Engine system events of the organization's instances, to the system-events function."
  destination      = "pubsub.googleapis.com/${google_pubsub_topic.system_events[0].id}"
  filter           = local.system_events_filter
  include_children = var.system_events.include_children
}

# The sink's own identity may publish to the log topic and nothing else.
resource "google_pubsub_topic_iam_member" "system_events_writer" {
  count = var.system_events.enabled ? 1 : 0

  project = var.project_id
  topic   = google_pubsub_topic.system_events[0].name
  role    = "roles/pubsub.publisher"
  member  = local.system_events_writer
}

# The function's runtime identity: publisher on the main topic only, like a VM's.
resource "google_service_account" "system_events" {
  count = var.system_events.enabled ? 1 : 0

  project      = var.project_id
  account_id   = local.system_events_account_id
  display_name = "maintenance-bridge system-events function"
  description  = "Publishes Compute Engine system events to ${local.topic_name}; nothing else."

  depends_on = [google_project_service.apis]

  lifecycle {
    # Its identity tokens are what makes a cloud event trusted (CLOUD_EVENTS_IDENTITY): a VM
    # running as this account could sign cloud events for any instance.
    precondition {
      condition     = !contains(var.publisher_service_account_emails, local.system_events_identity)
      error_message = "The system-events function's service account must not be a VM's (publisher_service_account_emails): consumers trust cloud events by its identity tokens."
    }
  }
}

resource "google_pubsub_topic_iam_member" "system_events_publisher" {
  count = var.system_events.enabled ? 1 : 0

  project = var.project_id
  topic   = google_pubsub_topic.events.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.system_events[0].email}"
}

resource "google_cloudfunctions2_function" "system_events" {
  for_each = local.system_events

  project     = var.project_id
  location    = var.region
  name        = "${var.name}-system-events"
  description = "Publishes Compute Engine system-event log entries as maintenance-bridge CloudEvents."
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
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.system_events[0].email
    environment_variables = {
      EVENTS_TOPIC = google_pubsub_topic.events.id
      TYPE_PREFIX  = var.type_prefix
    }
  }

  dynamic "event_trigger" {
    for_each = var.function_delivery == "eventarc" ? [1] : []
    content {
      trigger_region        = var.region
      event_type            = "google.cloud.pubsub.topic.v1.messagePublished"
      pubsub_topic          = google_pubsub_topic.system_events[0].id
      retry_policy          = "RETRY_POLICY_RETRY"
      service_account_email = google_service_account.invoker[0].email
    }
  }

  depends_on = [google_project_service.apis, time_sleep.build_grants]
}

resource "google_cloud_run_v2_service_iam_member" "system_events_invoker" {
  for_each = local.system_events

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.system_events[each.key].name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.invoker[0].email}"
}

# function_delivery = "push": the module's own subscription, with the main topic's dead letters
# (main.tf counts it among the delivering subscriptions the Pub/Sub agent may dead-letter from).
resource "google_pubsub_subscription" "system_events_push" {
  for_each = var.function_delivery == "push" ? local.system_events : {}

  project                    = var.project_id
  name                       = "${var.name}-system-events"
  topic                      = google_pubsub_topic.system_events[0].id
  labels                     = local.labels
  ack_deadline_seconds       = 60
  message_retention_duration = "86400s"

  push_config {
    push_endpoint = google_cloudfunctions2_function.system_events[each.key].service_config[0].uri
    oidc_token {
      service_account_email = google_service_account.invoker[0].email
      audience              = google_cloudfunctions2_function.system_events[each.key].service_config[0].uri
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

  depends_on = [google_pubsub_topic_iam_member.dead_letter_publisher]
}
