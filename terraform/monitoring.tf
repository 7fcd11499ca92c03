# Alerts and a dashboard on what the bridges report. The Ops Agent scrapes each bridge's /metrics
# on loopback (deploy/ops-agent/config.yaml, which the example template installs) into Managed
# Service for Prometheus: resource prometheus_target, with `namespace` = "INSTANCE_ID/NAME" and
# `location` = the zone, so every VM is its own series. The queries are PromQL.

locals {
  monitoring = var.monitoring.enabled

  # Per VM: its instance id (from namespace) and zone, to join with Compute Engine's own metrics.
  by_vm = "namespace, location"
  vm_id = "label_replace(%s, \"instance_id\", \"$1\", \"namespace\", \"([0-9]+)/.*\")"

  silence = "${var.monitoring.silence_minutes}m"
  uptime  = "max by (instance_id) (compute_googleapis_com:instance_uptime_total{monitored_resource=\"gce_instance\"})"

  alerts = {
    silent = {
      display_name = "maintenance-bridge silent on a running VM"
      severity     = "CRITICAL"
      duration     = "60s"
      # VMs whose bridge reported in the last 24 h, minus those with a heartbeat within the
      # silence window, kept only while the VM itself runs (a deleted, stopped or preempted VM
      # has no uptime series and raises nothing). A stopped bridge, a dead Ops Agent and a
      # bridge that cannot reach the metadata server all end up here.
      query   = <<-EOT
        (
          ${format(local.vm_id, "max by (${local.by_vm}) (max_over_time(maintenance_bridge_build_info[24h]))")}
          unless
          ${format(local.vm_id, "max by (${local.by_vm}) (increase(maintenance_bridge_events_total{kind=\"bridge.heartbeat\"}[${local.silence}]) > 0)")}
        )
        and on (instance_id)
        ${local.uptime}
      EOT
      content = <<-EOT
        The bridge on this VM (labels `namespace` = instance id/name, `location` = zone) has sent no
        heartbeat for ${local.silence} although the VM runs. Until it is back, this VM's maintenance
        and preemption notices reach nobody.

        On the VM: `systemctl status maintenance-bridge`, `journalctl -u maintenance-bridge -n 50`,
        `maintenance-bridge status`, `curl -s 127.0.0.1:${local.metrics_port}/readyz`. If the bridge
        runs, check the Ops Agent: `systemctl status google-cloud-ops-agent`.
      EOT
    }
    watch_stalled = {
      display_name = "maintenance-bridge not hearing from the metadata server"
      severity     = "CRITICAL"
      duration     = "60s"
      # Every watched key answers at least once a minute (the long-poll's timeout_sec, or the
      # re-ask of an absent key), so 5 minutes of silence on one key is a dead watcher or an
      # unreachable metadata server, which heartbeats alone would not show.
      query   = "time() - max by (${local.by_vm}, key) (maintenance_bridge_last_poll_timestamp_seconds) > 300"
      content = <<-EOT
        The bridge on this VM has had no answer from the metadata server for the key in the `key`
        label for 5 minutes. While that lasts it cannot see a maintenance or preemption notice.
        `curl -s 127.0.0.1:${local.metrics_port}/healthz` names the stuck watcher; the journal
        (`journalctl -u maintenance-bridge`) has the errors.
      EOT
    }
    outbox = {
      display_name = "maintenance-bridge events stuck in the outbox"
      severity     = "ERROR"
      duration     = "60s"
      query        = "max by (${local.by_vm}) (maintenance_bridge_outbox_oldest_age_seconds) > ${var.monitoring.outbox_max_age_seconds}"
      content      = <<-EOT
        The oldest event waiting in this bridge's outbox is older than
        ${var.monitoring.outbox_max_age_seconds} s: recorded, but Pub/Sub has not acknowledged it.
        Subscribers see it late or, if the VM goes away, never. `maintenance-bridge status` shows
        the last error; usual causes are a deleted topic or a missing roles/pubsub.publisher.
      EOT
    }
    publish_failures = {
      display_name = "maintenance-bridge publish failures"
      severity     = "WARNING"
      duration     = "300s"
      query        = "sum by (${local.by_vm}, reason) (increase(maintenance_bridge_publish_failures_total[10m])) > 0"
      content      = <<-EOT
        This bridge's publishes to Pub/Sub have been failing for 5 minutes (label `reason`:
        not_found, permission, paused, unavailable, other). Events wait in the outbox and go out
        once publishing works again; the outbox alert fires if they wait too long.
      EOT
    }
    dead_letters = {
      display_name = "maintenance-bridge dead letters waiting"
      severity     = "WARNING"
      duration     = "300s"
      query        = "${local.dead_letters} > ${var.monitoring.dead_letter_threshold}"
      content      = <<-EOT
        Messages a subscriber could not process were moved to the dead-letter topic and wait in
        `${google_pubsub_subscription.dead_letter.name}`. Inspect them with
        `gcloud pubsub subscriptions pull ${google_pubsub_subscription.dead_letter.name} --limit 10`
        and fix the subscriber before replaying them.
      EOT
    }
  }

  # One chart per question an operator asks of the fleet: title => PromQL queries drawn in it.
  latency      = "sum by (le) (rate(maintenance_bridge_change_to_publish_seconds_bucket[5m]))"
  dead_letters = "max by (subscription_id) (pubsub_googleapis_com:subscription_num_undelivered_messages{monitored_resource=\"pubsub_subscription\", subscription_id=\"${google_pubsub_subscription.dead_letter.name}\"})"
  charts = {
    "Events by kind and zone (per 5 min)"      = ["sum by (kind, location) (increase(maintenance_bridge_events_total{kind!=\"bridge.heartbeat\"}[5m]))"]
    "Outbox: oldest waiting event (s), per VM" = ["max by (${local.by_vm}) (maintenance_bridge_outbox_oldest_age_seconds)"]
    "Change to publish latency p50, p99 (s)"   = ["histogram_quantile(0.5, ${local.latency})", "histogram_quantile(0.99, ${local.latency})"]
    "Publish failures by reason (per 5 min)"   = ["sum by (reason) (increase(maintenance_bridge_publish_failures_total[5m]))"]
    "Bridges reporting, by version"            = ["count by (version) (maintenance_bridge_build_info)"]
    "Dead letters waiting"                     = [local.dead_letters]
  }
}

resource "google_monitoring_alert_policy" "bridge" {
  for_each = local.monitoring ? local.alerts : {}

  project               = var.project_id
  display_name          = each.value.display_name
  combiner              = "OR"
  severity              = each.value.severity
  notification_channels = var.monitoring.notification_channels

  conditions {
    display_name = each.value.display_name

    condition_prometheus_query_language {
      query               = each.value.query
      duration            = each.value.duration
      evaluation_interval = "60s"
      labels = {
        component = "maintenance-bridge"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = each.value.display_name
    content   = each.value.content
  }

  user_labels = merge(local.labels, { component = "maintenance-bridge" })

  depends_on = [google_project_service.apis]
}

resource "google_monitoring_dashboard" "bridge" {
  count = local.monitoring ? 1 : 0

  project = var.project_id
  dashboard_json = jsonencode({
    displayName = "maintenance-bridge (${local.topic_name})"
    mosaicLayout = {
      columns = 12
      tiles = [
        for i, title in keys(local.charts) : {
          xPos   = (i % 2) * 6
          yPos   = floor(i / 2) * 4
          width  = 6
          height = 4
          widget = {
            title = title
            xyChart = {
              dataSets = [
                for query in local.charts[title] : {
                  plotType        = "LINE"
                  timeSeriesQuery = { prometheusQuery = query }
                }
              ]
            }
          }
        }
      ]
    }
  })

  depends_on = [google_project_service.apis]
}
