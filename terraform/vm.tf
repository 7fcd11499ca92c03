# The example VM: an instance template whose start-up script installs the bridge from an artifact
# Terraform uploaded and hashed (locals.tf, deploy/vm-install.sh), turns on its metrics and
# heartbeats, and wires the Ops Agent; and the least privilege that needs. It installs the default
# maintenance-bridge, pinned by deploy/constraints.txt: the Pub/Sub sink over the REST API, no
# gRPC, protobuf or google-cloud-pubsub on the VM (maintenance-bridge[grpc] is not installed).

# The wheel (and the optional wheelhouse), named by their sha256: a rebuilt wheel is a new object,
# so a VM never reads a half-replaced one, and the start-up script checks the same hash.
resource "google_storage_bucket_object" "vm_artifact" {
  for_each = local.vm_artifacts

  bucket       = google_storage_bucket.functions_source[0].name
  name         = each.value.object
  source       = each.value.path
  content_type = "application/octet-stream"
}

# Read access to exactly these objects. The bucket has uniform bucket-level access (object ACLs
# are off), so the grant is a bucket-level binding with an IAM condition on the object names;
# conditions need uniform access anyway. storage.objects.list is checked against the bucket, not
# an object, so the condition also keeps the VM from listing the bucket.
resource "google_storage_bucket_iam_member" "vm_artifact_reader" {
  count = length(local.vm_artifacts) > 0 ? 1 : 0

  bucket = google_storage_bucket.functions_source[0].name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${local.vm_service_account}"

  condition {
    title       = "maintenance-bridge-vm-artifacts"
    description = "Only the bridge artifacts the instance template installs."
    expression = join(" || ", [
      for a in values(local.vm_artifacts) :
      "resource.name == \"projects/_/buckets/${local.artifact_bucket}/objects/${a.object}\""
    ])
  }
}

# What the Ops Agent on the VM needs to ship the bridge's logs and metrics: these two roles and no
# more (they can only be granted on the project).
resource "google_project_iam_member" "vm_telemetry" {
  for_each = local.vm.enabled && local.vm.ops_agent ? toset(["roles/logging.logWriter", "roles/monitoring.metricWriter"]) : toset([])

  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${local.vm_service_account}"
}

resource "google_compute_instance_template" "bridge" {
  count = local.vm.enabled ? 1 : 0

  project        = var.project_id
  region         = var.region
  name_prefix    = "${var.name}-"
  description    = "A VM that runs maintenance-bridge as the publisher service account."
  machine_type   = local.vm.machine_type
  labels         = local.labels
  tags           = ["maintenance-bridge"]
  can_ip_forward = false

  disk {
    source_image = local.vm.source_image
    boot         = true
    auto_delete  = true
    disk_size_gb = 10

    dynamic "disk_encryption_key" {
      for_each = local.vm.boot_disk_kms != null ? [local.vm.boot_disk_kms] : []
      content {
        kms_key_self_link = disk_encryption_key.value
      }
    }
  }

  # No external IP: the package index is reached through Cloud NAT, or not at all with a
  # wheelhouse (docs/operations.md, "VMs without external IP"). The bucket is reached through
  # Private Google Access on the subnetwork.
  network_interface {
    network    = local.vm.subnetwork == null ? local.vm.network : null
    subnetwork = local.vm.subnetwork
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
    precondition {
      condition     = contains(keys(local.vm_artifacts), "wheel") || local.vm.bridge_package != null
      error_message = "Nothing verifiable to install: run scripts/build-release (it leaves one wheel in dist/), or set example_instance_template.bridge_wheel, or bridge_package = \"maintenance-bridge==VERSION\" with bridge_package_hashes."
    }
  }

  # A VM created from the template must find its artifacts readable at first boot.
  depends_on = [
    google_project_service.apis,
    google_storage_bucket_object.vm_artifact,
    google_storage_bucket_iam_member.vm_artifact_reader,
    google_project_iam_member.vm_telemetry,
  ]
}
