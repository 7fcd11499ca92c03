# The smallest useful deployment: topic + schema + dead letters, a publisher service account for
# the VMs, the three example functions (notify posts to Google Chat) and the BigQuery history.
#
#   terraform init
#   terraform apply -var project_id=my-project
#   echo -n "https://chat.googleapis.com/v1/spaces/..." | \
#     gcloud secrets versions add "$(terraform output -raw notify_webhook_secret)" --data-file=-

provider "google" {
  project = var.project_id
  region  = var.region
}

module "maintenance_bridge" {
  source = "../.."

  project_id = var.project_id
  region     = var.region
  labels     = { env = "example" }

  notify = {
    chat_format = "google_chat"
  }

  ledger = {
    collection = "maintenance-ledger"
  }

  drain = {
    backends = var.drain_backends
  }

  bigquery_history = {
    enabled             = true
    location            = "US"
    deletion_protection = true
  }
}
