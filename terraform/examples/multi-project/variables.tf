variable "hub_project_id" {
  description = "The hub project: the topic, the functions, the ledger and the board."
  type        = string

  validation {
    condition     = can(regex("^[a-z][-a-z0-9]{4,28}[a-z0-9]$", var.hub_project_id))
    error_message = "hub_project_id must be a project id."
  }
}

variable "region" {
  description = "Region of the hub's functions."
  type        = string
  default     = "us-central1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a region name such as us-central1."
  }
}

variable "folder_id" {
  description = "The folder holding the fleet's projects (numeric id): one sink on it, children included, routes every project's system events to the hub."
  type        = string

  validation {
    condition     = can(regex("^[0-9]+$", var.folder_id))
    error_message = "folder_id must be the folder's numeric id."
  }
}

variable "vm_projects" {
  description = "The projects whose VMs run the bridge: each gets a service account for its VMs, allowed to publish to the hub's topic and nothing else."
  type        = list(string)

  validation {
    condition     = length(var.vm_projects) > 0 && alltrue([for p in var.vm_projects : can(regex("^[a-z][-a-z0-9]{4,28}[a-z0-9]$", p))])
    error_message = "vm_projects must list one or more project ids."
  }
}
