variable "project_id" {
  description = "Project to deploy into."
  type        = string
}

variable "region" {
  description = "Region of the functions and the instance template."
  type        = string
  default     = "us-central1"
}

variable "drain_backends" {
  description = "Unmanaged instance groups / zonal NEGs the drain function may take VMs out of."
  type = list(object({
    type = optional(string, "instance_group")
    zone = string
    name = string
    port = optional(number)
  }))
  default = []
}
