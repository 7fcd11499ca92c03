output "topic_id" {
  description = "The events topic (projects/P/topics/T): pass it to `maintenance-bridge run --topic`."
  value       = google_pubsub_topic.events.id
}

output "topic_name" {
  description = "Short name of the events topic."
  value       = google_pubsub_topic.events.name
}

output "schema_id" {
  description = "The Pub/Sub schema attached to the topic, or null when attach_schema = false."
  value       = try(google_pubsub_schema.event_data[0].id, null)
}

output "dead_letter_topic_id" {
  description = "Where undeliverable messages go."
  value       = google_pubsub_topic.dead_letter.id
}

output "dead_letter_subscription_id" {
  description = "Pull subscription on the dead-letter topic, for inspecting and replaying dead letters."
  value       = google_pubsub_subscription.dead_letter.id
}

output "subscriptions" {
  description = "Subscriptions the module created (name -> id): the push subscriptions (function_delivery = \"push\") and the BigQuery one. Eventarc-managed trigger subscriptions are not Terraform resources."
  value = merge(
    { for fn, sub in google_pubsub_subscription.push : fn => sub.id },
    var.bigquery_history.enabled ? { bigquery = google_pubsub_subscription.bigquery[0].id } : {},
  )
}

output "functions" {
  description = "The example subscribers: name, URL, runtime service account and (Eventarc delivery) trigger."
  value = {
    for fn, f in google_cloudfunctions2_function.function : fn => {
      name            = f.name
      uri             = f.service_config[0].uri
      service_account = google_service_account.function[fn].email
      trigger         = try(f.event_trigger[0].trigger, null)
    }
  }
}

output "board" {
  description = "The fleet board (enable_board): function name, URL, service account and the command that opens it locally; null when disabled."
  value = var.enable_board ? {
    name            = google_cloudfunctions2_function.board[0].name
    uri             = google_cloudfunctions2_function.board[0].service_config[0].uri
    service_account = google_service_account.board[0].email
    open            = "gcloud run services proxy ${google_cloudfunctions2_function.board[0].name} --project ${var.project_id} --region ${var.region} --port 8080"
  } : null
}

output "publisher_service_accounts" {
  description = "Every service account allowed to publish to the topic (and only to it)."
  value       = values(local.publishers)
}

output "service_accounts" {
  description = "All service accounts the module created."
  value = {
    publisher = try(google_service_account.publisher[0].email, null)
    invoker   = try(google_service_account.invoker[0].email, null)
    functions = { for fn, sa in google_service_account.function : fn => sa.email }
    build     = try(google_service_account.build[0].email, null)
    board     = try(google_service_account.board[0].email, null)
  }
}

output "notify_webhook_secret" {
  description = "Secret Manager secret the notify function reads the webhook URL from (add a version with the URL)."
  value       = var.notify.enabled ? "projects/${var.project_id}/secrets/${local.notify_secret_id}" : null
}

output "functions_source_bucket" {
  description = "Bucket holding the functions' source zips."
  value       = try(google_storage_bucket.functions_source[0].name, null)
}

output "bigquery_table" {
  description = "The maintenance history table (project.dataset.table), or null."
  value       = var.bigquery_history.enabled ? "${var.project_id}.${var.bigquery_history.dataset_id}.${var.bigquery_history.table_id}" : null
}

output "instance_template" {
  description = "Self link of the example instance template running the bridge, or null."
  value       = try(google_compute_instance_template.bridge[0].self_link, null)
}

output "bridge_artifacts" {
  description = "What the example VMs install, uploaded to the module's bucket: per artifact (wheel, wheelhouse) its gs:// URL and sha256, which the start-up script checks."
  value = {
    for kind, a in local.vm_artifacts : kind => {
      url    = "gs://${google_storage_bucket_object.vm_artifact[kind].bucket}/${google_storage_bucket_object.vm_artifact[kind].name}"
      sha256 = a.sha256
    }
  }
}

output "monitoring" {
  description = "The alert policies (key -> resource name) and the dashboard id; empty with monitoring.enabled = false."
  value = {
    alert_policies = { for k, p in google_monitoring_alert_policy.bridge : k => p.name }
    dashboard      = try(google_monitoring_dashboard.bridge[0].id, null)
  }
}

output "system_events" {
  description = "The cloud's side, or null when system_events.enabled = false: the log topic, the sink (its resource id and the writer identity granted publisher on the log topic only) and the system-events function."
  value = var.system_events.enabled ? {
    topic           = google_pubsub_topic.system_events[0].id
    sink            = one(concat(google_logging_project_sink.system_events[*].id, google_logging_folder_sink.system_events[*].id, google_logging_organization_sink.system_events[*].id))
    writer_identity = local.system_events_writer
    function        = google_cloudfunctions2_function.system_events["system-events"].name
  } : null
}

output "cloud_events_identity" {
  description = "The service account whose identity tokens attest the cloud's events (data.origin \"cloud\"): CLOUD_EVENTS_IDENTITY for any consumer of the topic that verifies origin (docs/events.md); empty when system_events.enabled = false."
  value       = local.system_events_identity
}

output "autopilot" {
  description = "The autopilot (enable_autopilot): function name, URL, service account, scheduler job, and a dry-run command for an autopilot_operators member; null when disabled."
  value = var.enable_autopilot ? {
    name            = google_cloudfunctions2_function.autopilot[0].name
    uri             = google_cloudfunctions2_function.autopilot[0].service_config[0].uri
    service_account = google_service_account.autopilot[0].email
    scheduler_job   = google_cloud_scheduler_job.autopilot[0].id
    dry_run         = "curl -sS -X POST -H \"Authorization: Bearer $(gcloud auth print-identity-token)\" '${google_cloudfunctions2_function.autopilot[0].service_config[0].uri}?dry_run=true'"
  } : null
}
