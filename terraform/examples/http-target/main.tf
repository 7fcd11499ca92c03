# Direct delivery: the bridge on each VM POSTs its CloudEvents straight to one private function
# over HTTPS (--sink http), with the VM service account's Google-signed ID token, instead of
# publishing to the topic. The module still creates the topic and the publisher account (the VMs
# run as it); this example adds the one grant direct delivery needs, roles/run.invoker on the
# target function's Cloud Run service, and sets the instance template's bridge settings.
#
#   scripts/build-release
#   terraform init
#   terraform apply -var project_id=my-project
#
# The target is the ledger: its CloudEvent handler is invoked directly. See docs/http.md for the
# headers on the wire, retries, parked events and `maintenance-bridge redrive`.

provider "google" {
  project = var.project_id
  region  = var.region
}

locals {
  target = module.maintenance_bridge.functions[var.target_function]
}

# The audience is the function's URL: Cloud Run checks the token's audience against it. The
# BigQuery history is off here, spelled out because checkov does not read optional() defaults.
module "maintenance_bridge" {
  source = "../.."

  project_id = var.project_id
  region     = var.region
  labels     = { env = "example", delivery = "http" }

  ledger = {
    collection = "maintenance-ledger"
  }

  bigquery_history = {
    enabled             = false
    deletion_protection = true
  }

  example_instance_template = {
    bridge_settings = {
      BRIDGE_SINK          = "http"
      BRIDGE_HTTP_URL      = local.target.uri
      BRIDGE_HTTP_AUDIENCE = local.target.uri
    }
  }
}

# The VMs' service account may invoke that one function, nothing else.
resource "google_cloud_run_v2_service_iam_member" "bridge_invoker" {
  project  = var.project_id
  location = var.region
  name     = local.target.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${module.maintenance_bridge.service_accounts.publisher}"
}
