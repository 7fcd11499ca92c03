variable "project_id" {
  description = "Project to deploy into."
  type        = string
}

variable "region" {
  description = "Region of the functions and the instance template."
  type        = string
  default     = "us-central1"
}

variable "target_function" {
  description = "The example function the bridges POST their events to (its key in the module's functions output)."
  type        = string
  default     = "ledger"
}
