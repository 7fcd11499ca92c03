output "topic_id" {
  description = "Give this to the bridge: maintenance-bridge run --topic <topic_id>."
  value       = module.maintenance_bridge.topic_id
}

output "notify_webhook_secret" {
  description = "Add the chat webhook URL as a version of this secret."
  value       = module.maintenance_bridge.notify_webhook_secret
}

output "functions" {
  description = "The deployed example subscribers."
  value       = module.maintenance_bridge.functions
}

output "instance_template" {
  description = "Create VMs from this template to run the bridge."
  value       = module.maintenance_bridge.instance_template
}

output "publisher_service_accounts" {
  description = "Service accounts allowed to publish to the topic."
  value       = module.maintenance_bridge.publisher_service_accounts
}
