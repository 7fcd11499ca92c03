output "target_url" {
  description = "Where the bridges send their events (BRIDGE_HTTP_URL and BRIDGE_HTTP_AUDIENCE)."
  value       = local.target.uri
}

output "instance_template" {
  description = "Create VMs from this template: their bridge delivers over HTTP."
  value       = module.maintenance_bridge.instance_template
}

output "bridge_service_account" {
  description = "The VMs' service account, granted roles/run.invoker on the target."
  value       = module.maintenance_bridge.service_accounts.publisher
}
