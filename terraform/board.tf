# The fleet board (functions/board, docs/board.md): an HTTP function that reads the ledger's
# collection and serves one page over it. Private: only var.board_viewers may invoke it (open it
# with `gcloud run services proxy`), and its own account may only read the ledger's database.
# Its zip is built with the subscribers' (main.tf, from functions/archive.json).

locals {
  # Without the ledger there is no bucket to upload to: the function's precondition says so.
  function_archives = merge(local.functions, var.enable_board && var.ledger.enabled ? { board = {} } : {}, local.system_events, local.autopilot_archive)
}

resource "google_service_account" "board" {
  count = var.enable_board ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name}-board"
  display_name = "maintenance-bridge fleet board"
  description  = "Runtime identity of the fleet board: reads the ledger, nothing else."

  depends_on = [google_project_service.apis]
}

resource "google_project_iam_member" "board" {
  count = var.enable_board ? 1 : 0

  project = var.project_id
  role    = "roles/datastore.viewer"
  member  = "serviceAccount:${google_service_account.board[0].email}"

  condition {
    title       = "maintenance-bridge-board-database"
    description = "Only the ledger's Firestore database, read-only."
    expression  = "resource.name == \"projects/${var.project_id}/databases/${var.ledger.database}\""
  }
}

resource "google_cloudfunctions2_function" "board" {
  # checkov:skip=CKV_GCP_124:Ingress is open so that a viewer's `gcloud run services proxy` reaches it; IAM (run.invoker for board_viewers only) is the gate.
  count = var.enable_board ? 1 : 0

  project     = var.project_id
  location    = var.region
  name        = "${var.name}-board"
  description = "The fleet board: which VMs are in maintenance now and which are scheduled next."
  labels      = local.labels

  build_config {
    runtime           = "python312"
    entry_point       = "board"
    service_account   = google_service_account.build[0].id
    docker_repository = google_artifact_registry_repository.functions[0].id
    source {
      storage_source {
        bucket = google_storage_bucket.functions_source[0].name
        object = google_storage_bucket_object.function["board"].name
      }
    }
  }

  service_config {
    # One read of the whole collection is cached per instance and serves every viewer: few
    # instances, each with room for 10,000 projected documents and concurrent requests.
    available_memory                 = "512M"
    available_cpu                    = "1"
    timeout_seconds                  = 60
    max_instance_count               = 2
    max_instance_request_concurrency = 16
    # Reachable from a viewer's `gcloud run services proxy`; IAM (run.invoker) is the gate.
    ingress_settings               = "ALLOW_ALL"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.board[0].email
    environment_variables = {
      GOOGLE_CLOUD_PROJECT = var.project_id
      FIRESTORE_DATABASE   = var.ledger.database
      LEDGER_COLLECTION    = var.ledger.collection
    }
  }

  lifecycle {
    precondition {
      condition     = var.ledger.enabled
      error_message = "enable_board needs the ledger (ledger.enabled = true): the board shows its collection."
    }
  }

  depends_on = [google_project_service.apis, time_sleep.build_grants]
}

resource "google_cloud_run_v2_service_iam_member" "board_viewers" {
  for_each = var.enable_board ? toset(var.board_viewers) : toset([])

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.board[0].name
  role     = "roles/run.invoker"
  member   = each.value
}
