variable "project_id" {
  description = "Project whose Cloud Logging receives the bridges' logs (where the VMs run)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a Google Cloud project ID (6-30 characters: a-z, 0-9, -)."
  }
}

variable "heartbeat_interval_seconds" {
  description = "The bridges' --heartbeat-interval (BRIDGE_HEARTBEAT_INTERVAL), in seconds."
  type        = number
  default     = 300

  validation {
    condition     = var.heartbeat_interval_seconds >= 10 && var.heartbeat_interval_seconds <= 3600
    error_message = "heartbeat_interval_seconds must be between 10 and 3600."
  }
}

variable "missed_beats" {
  description = "How many heartbeats in a row a bridge may miss before the alert fires. The silence window is missed_beats x the interval, and never under 10 minutes (log-based metrics and the VM uptime metric arrive a few minutes late)."
  type        = number
  default     = 3

  validation {
    condition     = var.missed_beats >= 2 && floor(var.missed_beats) == var.missed_beats
    error_message = "missed_beats must be a whole number, 2 or more."
  }
}

variable "remember_hours" {
  description = "A bridge counts as one that used to beat if it beat within this many hours. A bridge silent for longer drops out of the alert (its incident closes)."
  type        = number
  default     = 24

  validation {
    condition     = var.remember_hours >= 1 && var.remember_hours <= 168 && floor(var.remember_hours) == var.remember_hours
    error_message = "remember_hours must be a whole number from 1 to 168."
  }
}

variable "metric_name" {
  description = "Name of the log-based metric that counts heartbeats."
  type        = string
  default     = "maintenance_bridge_heartbeats"

  validation {
    condition     = can(regex("^[A-Za-z0-9_]{1,100}$", var.metric_name))
    error_message = "metric_name: letters, digits and _ only (the PromQL name is derived from it)."
  }
}

variable "log_filter" {
  description = "Cloud Logging filter that matches one log entry per published heartbeat. The default matches the bridge's 'heartbeat published' line on Compute Engine VMs, parsed by the Ops Agent (jsonPayload.message, see docs/operations.md) or shipped as text (COS, gcplogs)."
  type        = string
  default     = <<-EOT
    resource.type="gce_instance"
    (jsonPayload.message:"heartbeat published" OR textPayload:"heartbeat published")
  EOT
}

variable "notification_channels" {
  description = "IDs of existing notification channels (projects/P/notificationChannels/N) to notify."
  type        = list(string)
  default     = []
}

variable "notification_email" {
  description = "If set, an email notification channel to this address is created and notified as well."
  type        = string
  default     = null
}

variable "severity" {
  description = "Severity of the incidents: CRITICAL, ERROR or WARNING."
  type        = string
  default     = "WARNING"

  validation {
    condition     = contains(["CRITICAL", "ERROR", "WARNING"], var.severity)
    error_message = "severity must be CRITICAL, ERROR or WARNING."
  }
}
