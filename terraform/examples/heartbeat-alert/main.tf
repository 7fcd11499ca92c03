# Alert when a maintenance-bridge that used to send heartbeats falls silent while its VM runs.
#
#   terraform init
#   terraform apply -var project_id=my-project -var notification_email=oncall@example.com
#
# The bridges run with --heartbeat-interval (300 s by default here) and their logs reach Cloud
# Logging (docs/operations.md, "Logs in Cloud Logging"). README.md explains the choices.

provider "google" {
  project = var.project_id
}

locals {
  # Never shorter than 10 minutes: log-based metric points and the uptime metric arrive late.
  silence_seconds = max(600, var.missed_beats * var.heartbeat_interval_seconds)
  silence         = "${ceil(local.silence_seconds / 60)}m"

  # The monitored resource of every entry (gce_instance) gives each VM its own time series.
  by         = "project_id, zone, instance_id"
  heartbeats = "logging_googleapis_com:user_${var.metric_name}{monitored_resource=\"gce_instance\"}"
  uptime     = "compute_googleapis_com:instance_uptime_total{monitored_resource=\"gce_instance\"}"

  # VMs that beat in the last remember_hours, minus those that beat within the silence window,
  # kept only while the VM itself is running: a VM that was deleted, stopped, preempted or is
  # restarting for TERMINATE host maintenance has no uptime series and raises nothing.
  query = <<-EOT
    (
      max by (${local.by}) (count_over_time(${local.heartbeats}[${var.remember_hours}h]))
      unless
      max by (${local.by}) (count_over_time(${local.heartbeats}[${local.silence}]))
    )
    and on (${local.by})
    max by (${local.by}) (${local.uptime})
  EOT

  channels = concat(
    var.notification_channels,
    google_monitoring_notification_channel.email[*].id,
  )
}

resource "google_logging_metric" "heartbeats" {
  name        = var.metric_name
  description = "Heartbeats published by maintenance-bridge, one time series per VM (gce_instance)."
  filter      = trimspace(var.log_filter)

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "maintenance-bridge heartbeats"
  }
}

resource "google_monitoring_notification_channel" "email" {
  count = var.notification_email == null ? 0 : 1

  display_name = "maintenance-bridge heartbeat alerts (${var.notification_email})"
  type         = "email"
  labels = {
    email_address = var.notification_email
  }
}

resource "google_monitoring_alert_policy" "bridge_silent" {
  display_name          = "maintenance-bridge silent on a running VM"
  combiner              = "OR"
  severity              = var.severity
  notification_channels = local.channels

  conditions {
    display_name = "No heartbeat for ${local.silence} from a bridge that beat in the last ${var.remember_hours} h"

    condition_prometheus_query_language {
      query               = local.query
      duration            = "60s"
      evaluation_interval = "60s"
      rule_group          = "maintenance-bridge"
      alert_rule          = "MaintenanceBridgeSilent"
      labels = {
        component = "maintenance-bridge"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "maintenance-bridge silent on a running VM"
    content   = <<-EOT
      A maintenance-bridge that published heartbeats in the last ${var.remember_hours} h has not
      published one for ${local.silence}, and its VM is still running. Until it is back, this VM's
      host-maintenance and preemption notices reach nobody. The incident's labels
      (`instance_id`, `zone`) name the VM.

      On the VM:

      - `systemctl status maintenance-bridge` and `journalctl -u maintenance-bridge -n 50`
      - `maintenance-bridge status` (last publish, last error, events waiting in the outbox)
      - `curl -s 127.0.0.1:PORT/healthz` if it runs with `--http-port`

      A failing publish (permission, topic deleted) shows as `last error` and a growing outbox;
      a stuck watcher as a 503 from `/healthz`; a stopped service in systemd. If the logging
      agent stopped instead, the bridge may be fine: check `journalctl`.
    EOT
  }

  user_labels = {
    component = "maintenance-bridge"
  }

  depends_on = [google_logging_metric.heartbeats]
}
