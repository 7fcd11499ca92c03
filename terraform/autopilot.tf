# The autopilot (functions/autopilot, docs/autopilot.md): Cloud Scheduler calls an HTTP function
# every few minutes that starts reschedulable maintenance early (instances.performMaintenance)
# when var.autopilot_policy allows it, reading and annotating the ledger's documents. Off by
# default (enable_autopilot). Its own identity may get and performMaintenance instances and use
# the ledger's database, nothing else; only the scheduler's account and autopilot_operators may
# invoke it. Its zip is built with the subscribers' (main.tf, from functions/archive.json).

locals {
  # Without the ledger there is nothing to read: the function's precondition says so.
  autopilot_archive = var.enable_autopilot && var.ledger.enabled ? { autopilot = {} } : {}
}

resource "google_service_account" "autopilot" {
  count = var.enable_autopilot ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name}-autopilot"
  display_name = "maintenance-bridge autopilot"
  description  = "Runtime identity of the autopilot: gets instances and starts their scheduled maintenance; reads and annotates the ledger."

  depends_on = [google_project_service.apis]
}

# No predefined role is this narrow (compute.instanceAdmin could delete VMs): exactly the two
# calls the function makes.
resource "google_project_iam_custom_role" "autopilot" {
  count = var.enable_autopilot ? 1 : 0

  project     = var.project_id
  role_id     = replace("${var.name}_autopilot", "-", "_")
  title       = "maintenance-bridge autopilot"
  description = "Read an instance and start its scheduled maintenance early, nothing else."
  permissions = ["compute.instances.get", "compute.instances.performMaintenance"]

  depends_on = [google_project_service.apis]
}

resource "google_project_iam_member" "autopilot" {
  count = var.enable_autopilot ? 1 : 0

  project = var.project_id
  role    = google_project_iam_custom_role.autopilot[0].id
  member  = "serviceAccount:${google_service_account.autopilot[0].email}"

  # The role's two permissions are on instances anyway; the condition keeps it so if the role
  # ever grows.
  condition {
    title       = "maintenance-bridge-autopilot-instances"
    description = "Compute Engine instances of this project only."
    expression  = "resource.type == \"compute.googleapis.com/Instance\" && resource.name.startsWith(\"projects/${var.project_id}/zones/\")"
  }
}

# The ledger: read the documents, write the `autopilot` field of each (a claim per window in a
# transaction), under an IAM condition naming the ledger's one database.
resource "google_project_iam_member" "autopilot_ledger" {
  count = var.enable_autopilot ? 1 : 0

  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.autopilot[0].email}"

  condition {
    title       = "maintenance-bridge-autopilot-database"
    description = "Only the ledger's Firestore database."
    expression  = "resource.name == \"projects/${var.project_id}/databases/${var.ledger.database}\""
  }
}

resource "google_cloudfunctions2_function" "autopilot" {
  count = var.enable_autopilot ? 1 : 0

  project     = var.project_id
  location    = var.region
  name        = "${var.name}-autopilot"
  description = "Starts scheduled maintenance early, when the fleet can afford it (docs/autopilot.md)."
  labels      = local.labels

  build_config {
    runtime           = "python312"
    entry_point       = "tick"
    service_account   = google_service_account.build[0].id
    docker_repository = google_artifact_registry_repository.functions[0].id
    source {
      storage_source {
        bucket = google_storage_bucket.functions_source[0].name
        object = google_storage_bucket_object.function["autopilot"].name
      }
    }
  }

  service_config {
    available_memory = "256M"
    timeout_seconds  = 300
    # One tick at a time: the plan counts what is in maintenance, so two ticks must not plan
    # on the same reads (a window's claim is transactional besides, and the requestId is too).
    max_instance_count               = 1
    max_instance_request_concurrency = 1
    # Cloud Scheduler in the same project counts as internal traffic, like Eventarc and Pub/Sub
    # push; operators calling it by hand (a dry run) come from outside. IAM is the gate either way.
    ingress_settings               = length(var.autopilot_operators) > 0 ? "ALLOW_ALL" : "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.autopilot[0].email
    environment_variables = {
      GOOGLE_CLOUD_PROJECT = var.project_id
      FIRESTORE_DATABASE   = var.ledger.database
      LEDGER_COLLECTION    = var.ledger.collection
      AUTOPILOT_POLICY     = jsonencode(var.autopilot_policy)
    }
  }

  lifecycle {
    precondition {
      condition     = var.ledger.enabled
      error_message = "enable_autopilot needs the ledger (ledger.enabled = true): it reads the scheduled windows there."
    }
  }

  depends_on = [google_project_service.apis, time_sleep.build_grants]
}

# Cloud Scheduler signs its OIDC token as this account, which may invoke the autopilot only.
resource "google_service_account" "autopilot_scheduler" {
  count = var.enable_autopilot ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name}-autopilot-tick"
  display_name = "maintenance-bridge autopilot scheduler"
  description  = "Cloud Scheduler's identity for the autopilot's ticks: run.invoker on the autopilot only."

  depends_on = [google_project_service.apis]
}

resource "google_cloud_run_v2_service_iam_member" "autopilot_scheduler" {
  count = var.enable_autopilot ? 1 : 0

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.autopilot[0].name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.autopilot_scheduler[0].email}"
}

# People (or pipelines) who may call it by hand, for a dry run: `?dry_run=true`.
resource "google_cloud_run_v2_service_iam_member" "autopilot_operators" {
  for_each = var.enable_autopilot ? toset(var.autopilot_operators) : toset([])

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.autopilot[0].name
  role     = "roles/run.invoker"
  member   = each.value
}

resource "google_cloud_scheduler_job" "autopilot" {
  count = var.enable_autopilot ? 1 : 0

  project          = var.project_id
  region           = var.region
  name             = "${var.name}-autopilot"
  description      = "One autopilot tick: start the scheduled maintenance the policy allows now."
  schedule         = var.autopilot_schedule
  time_zone        = "Etc/UTC"
  attempt_deadline = "320s"

  # A retried tick is safe: a window is claimed once, and its requestId is derived from it.
  retry_config {
    retry_count          = 1
    min_backoff_duration = "30s"
  }

  http_target {
    http_method = "POST"
    uri         = google_cloudfunctions2_function.autopilot[0].service_config[0].uri
    oidc_token {
      service_account_email = google_service_account.autopilot_scheduler[0].email
      audience              = google_cloudfunctions2_function.autopilot[0].service_config[0].uri
    }
  }

  depends_on = [google_project_service.apis, google_cloud_run_v2_service_iam_member.autopilot_scheduler]
}
