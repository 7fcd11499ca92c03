output "metric_type" {
  description = "Metric type of the heartbeat counter (Metrics Explorer, dashboards)."
  value       = "logging.googleapis.com/user/${google_logging_metric.heartbeats.name}"
}

output "alert_policy" {
  description = "Resource name of the alert policy."
  value       = google_monitoring_alert_policy.bridge_silent.name
}

output "promql" {
  description = "The alert's query: paste it into Metrics Explorer (PromQL) to see which VMs it would fire for now."
  value       = local.query
}

output "silence_window" {
  description = "How long a bridge may stay silent before the alert fires (after the 60 s for duration)."
  value       = local.silence
}
