variable "location" {
  description = "Azure region of the storage account, e.g. westeurope."
  type        = string
}

variable "create_resource_group" {
  description = "Create the resource group (true) or use one that exists (false)."
  type        = bool
  default     = true
}

variable "resource_group_name" {
  description = "The resource group to create or use."
  type        = string
  default     = "wattbus-backups"
}

variable "storage_account_name" {
  description = "Globally unique, 3-24 lower-case letters and digits, e.g. wattbusbackups1234."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9]{3,24}$", var.storage_account_name))
    error_message = "storage_account_name must be 3-24 lower-case letters and digits."
  }
}

variable "container_name" {
  description = "The private container backup-rotator writes its sets into ([backup_rotator.storage] container)."
  type        = string
  default     = "wattbus-backups"

  validation {
    condition     = can(regex("^[a-z0-9](-?[a-z0-9]){2,62}$", var.container_name))
    error_message = "container_name must be 3-63 lower-case letters, digits and single hyphens."
  }
}

variable "replication_type" {
  description = "LRS, ZRS, GRS, RAGRS, GZRS or RAGZRS. GRS keeps a copy in a second region: a backup outlives a region's outage."
  type        = string
  default     = "GRS"

  validation {
    condition     = contains(["LRS", "ZRS", "GRS", "RAGRS", "GZRS", "RAGZRS"], var.replication_type)
    error_message = "replication_type must be one of LRS, ZRS, GRS, RAGRS, GZRS, RAGZRS."
  }
}

variable "delete_after_days" {
  description = <<-EOT
    The lifecycle rule's backstop: blobs older than this are deleted by Azure, whatever the
    rotator does. The rotator keeps the latest `keep` full sets (by count); this only catches
    what it could not delete. It must be well beyond keep x full_every_h (10 days by default):
    if the Pi dies, this is how long its last backups survive it. 0 turns the rule off.
  EOT
  type        = number
  default     = 90

  validation {
    condition     = var.delete_after_days == 0 || var.delete_after_days >= 14
    error_message = "delete_after_days must be 0 (no lifecycle rule) or at least 14: shorter would delete sets the rotator still keeps."
  }
}

variable "soft_delete_days" {
  description = "Deleted blobs, containers and old versions are recoverable for this many days (1-365)."
  type        = number
  default     = 14

  validation {
    condition     = var.soft_delete_days >= 1 && var.soft_delete_days <= 365
    error_message = "soft_delete_days must be from 1 to 365."
  }
}

variable "allowed_ip_ranges" {
  description = <<-EOT
    Public IPs or CIDR ranges allowed to reach the account (the Pi's connection, the machine
    running terraform). Empty: reachable from any network, still only with a credential (a
    home connection's address changes; the backups must not stop when it does).
  EOT
  type        = list(string)
  default     = []
}

variable "shared_key_enabled" {
  description = "Allow the account key and SAS tokens signed with it. false: only Azure AD (a service principal, var.backup_principal_id); then sas_token is not made."
  type        = bool
  default     = true
}

variable "sas_lifetime_days" {
  description = "Lifetime of the container SAS this outputs; terraform apply renews it once it is older than sas_renew_after_days."
  type        = number
  default     = 365
}

variable "sas_renew_after_days" {
  description = "Renew the SAS after this many days (before it expires: put the new one on the Pi)."
  type        = number
  default     = 335
}

variable "backup_principal_id" {
  description = "Object id of a service principal (or managed identity) that gets Storage Blob Data Contributor on the container only. Empty: none."
  type        = string
  default     = ""
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = { project = "wattbus", purpose = "influxdb-backups" }
}

variable "log_analytics_workspace_id" {
  description = "A Log Analytics workspace to send the blob service's read, write and delete logs to (who touched the backups). Empty: no logs (they cost more than the backups)."
  type        = string
  default     = ""
}
