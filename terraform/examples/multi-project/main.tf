# One fleet across projects (docs/operations.md, "One fleet across projects"): the hub project
# holds the topic, the functions, the ledger and the board; a folder-level sink routes the
# system events of every project under the folder to the hub; the VMs of each project publish to
# the hub's topic as a service account of their own project, granted publisher on that topic only.
#
#   terraform init
#   terraform apply -var hub_project_id=ops-hub -var folder_id=123456789012 \
#     -var 'vm_projects=["team-a-prod","team-b-prod"]'
#
# Applying needs roles/logging.configWriter on the folder (the sink) and rights to create service
# accounts in each VM project. The VMs run `maintenance-bridge run --topic <topic_id>` as
# `<project>`'s `maintenance-bridge-vm` account (output `vm_service_accounts`).

provider "google" {
  project = var.hub_project_id
  region  = var.region
}

locals {
  # Built from the names rather than read from the accounts, so that the module's grants are
  # keyed by values known at plan time; depends_on below makes the accounts exist first.
  vm_service_accounts = {
    for p in var.vm_projects : p => "maintenance-bridge-vm@${p}.iam.gserviceaccount.com"
  }
}

resource "google_service_account" "vm" {
  for_each = toset(var.vm_projects)

  project      = each.key
  account_id   = "maintenance-bridge-vm"
  display_name = "maintenance-bridge on this project's VMs"
  description  = "Publishes this project's maintenance events to the hub's topic; nothing else."
}

# The VMs' accounts live in their own projects: the module grants each publisher on the topic.
# No example VM template in the hub (the VMs are the other projects'), no BigQuery history
# (named with its deletion protection, as checkov reads a module call's inputs as written).
module "maintenance_bridge" {
  source = "../.."

  project_id = var.hub_project_id
  region     = var.region
  labels     = { env = "example" }

  create_publisher_service_account = false
  publisher_service_account_emails = values(local.vm_service_accounts)
  example_instance_template        = { enabled = false }
  bigquery_history                 = { enabled = false, deletion_protection = true }

  system_events = {
    scope            = "folder"
    folder_id        = var.folder_id
    include_children = true
  }

  enable_board = true

  depends_on = [google_service_account.vm]
}
