output "topic_id" {
  description = "The hub's topic: every project's bridges run with --topic <topic_id>."
  value       = module.maintenance_bridge.topic_id
}

output "vm_service_accounts" {
  description = "Per VM project, the service account its VMs run the bridge as (publisher on the hub's topic only)."
  value       = { for p, sa in google_service_account.vm : p => sa.email }
}

output "system_events" {
  description = "The folder sink, its writer identity and the log topic in the hub."
  value       = module.maintenance_bridge.system_events
}

output "board" {
  description = "The fleet board over the hub's ledger: every project's instances."
  value       = module.maintenance_bridge.board
}
