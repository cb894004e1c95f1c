# Azure Blob storage for backup-rotator (docs/backups.md): a hardened storage account, one
# private container, a lifecycle rule as a backstop, and a credential for the Pi (a SAS
# scoped to the container, or a role for a service principal).

resource "azurerm_resource_group" "this" {
  count    = var.create_resource_group ? 1 : 0
  name     = var.resource_group_name
  location = var.location
  tags     = var.tags
}

data "azurerm_resource_group" "this" {
  count = var.create_resource_group ? 0 : 1
  name  = var.resource_group_name
}

locals {
  resource_group_name = var.create_resource_group ? azurerm_resource_group.this[0].name : data.azurerm_resource_group.this[0].name
}

resource "azurerm_storage_account" "this" {
  #checkov:skip=CKV_AZURE_59:A Pi at home reaches Azure over the internet; there is no private network to put an endpoint in. Access needs a credential, and allowed_ip_ranges narrows it to known addresses.
  #checkov:skip=CKV2_AZURE_33:Private endpoints need a virtual network the Pi is in (same reason as CKV_AZURE_59).
  #checkov:skip=CKV_AZURE_35:Deny by default only when allowed_ip_ranges is set: a home connection's address changes, and backups must not stop when it does.
  #checkov:skip=CKV2_AZURE_1:Encrypted at rest twice (Microsoft-managed keys plus infrastructure encryption); a customer-managed key needs a Key Vault the user must then keep alive, or every backup is lost with it.
  #checkov:skip=CKV2_AZURE_40:The Pi authenticates with a SAS signed by the account key unless it has a service principal; set shared_key_enabled = false when it does.
  #checkov:skip=CKV_AZURE_33:Queue service logging: this account has no queues.
  name                     = var.storage_account_name
  resource_group_name      = local.resource_group_name
  location                 = var.location
  account_kind             = "StorageV2"
  account_tier             = "Standard"
  account_replication_type = var.replication_type
  # Hot: sets are written every hour and most are deleted within days; Cool would charge
  # for every early deletion.
  access_tier = "Hot"

  min_tls_version                   = "TLS1_2"
  https_traffic_only_enabled        = true
  allow_nested_items_to_be_public   = false
  public_network_access_enabled     = true
  shared_access_key_enabled         = var.shared_key_enabled
  default_to_oauth_authentication   = true
  infrastructure_encryption_enabled = true
  cross_tenant_replication_enabled  = false
  local_user_enabled                = false
  sftp_enabled                      = false

  # A SAS signed with the account key that lives longer than this is logged.
  sas_policy {
    expiration_period = "${var.sas_lifetime_days}.00:00:00"
    expiration_action = "Log"
  }

  blob_properties {
    # The rotator deletes old sets; versioning and soft delete keep what it (or anyone with
    # the credential) deleted or overwrote for soft_delete_days.
    versioning_enabled = true
    delete_retention_policy {
      days = var.soft_delete_days
    }
    container_delete_retention_policy {
      days = var.soft_delete_days
    }
  }

  network_rules {
    default_action = length(var.allowed_ip_ranges) > 0 ? "Deny" : "Allow"
    ip_rules       = var.allowed_ip_ranges
    bypass         = ["AzureServices", "Logging", "Metrics"]
  }

  tags = var.tags
}

resource "azurerm_storage_container" "backups" {
  #checkov:skip=CKV2_AZURE_21:Blob read logging is the optional diagnostic setting below (var.log_analytics_workspace_id), not the classic storage insights this check looks for; off by default for its cost.
  name                  = var.container_name
  storage_account_id    = azurerm_storage_account.this.id
  container_access_type = "private"
}

# The backstop: Azure deletes by age only. "Keep the latest N" is the rotator's (by count,
# never the only good copy); this rule only removes what is far older than anything the
# rotator keeps, and old versions and snapshots once their soft-delete time is over.
resource "azurerm_storage_management_policy" "backstop" {
  count              = var.delete_after_days > 0 ? 1 : 0
  storage_account_id = azurerm_storage_account.this.id

  rule {
    name    = "wattbus-backups-backstop"
    enabled = true
    filters {
      prefix_match = ["${azurerm_storage_container.backups.name}/"]
      blob_types   = ["blockBlob"]
    }
    actions {
      base_blob {
        delete_after_days_since_modification_greater_than = var.delete_after_days
      }
      version {
        delete_after_days_since_creation = var.soft_delete_days
      }
      snapshot {
        delete_after_days_since_creation_greater_than = var.soft_delete_days
      }
    }
  }
}

# The Pi's credential, option 1: a SAS for this container only (read, add, create, write,
# delete, list: what backup-rotator does), over HTTPS only. Renewed by `terraform apply`
# once it is sas_renew_after_days old.
resource "time_rotating" "sas" {
  count         = var.shared_key_enabled ? 1 : 0
  rotation_days = var.sas_renew_after_days
}

data "azurerm_storage_account_blob_container_sas" "backups" {
  count             = var.shared_key_enabled ? 1 : 0
  connection_string = azurerm_storage_account.this.primary_connection_string
  container_name    = azurerm_storage_container.backups.name
  https_only        = true
  start             = time_rotating.sas[0].rfc3339
  expiry            = timeadd(time_rotating.sas[0].rfc3339, "${var.sas_lifetime_days * 24}h")

  permissions {
    read   = true
    add    = true
    create = true
    write  = true
    delete = true
    list   = true
  }
}

# Option 2: a service principal (or managed identity) you made, with data access to this
# container only.
resource "azurerm_role_assignment" "backup_writer" {
  count                = var.backup_principal_id != "" ? 1 : 0
  scope                = azurerm_storage_container.backups.id
  role_definition_name = "Storage Blob Data Contributor"
  principal_id         = var.backup_principal_id
}

# Who read, wrote or deleted backups: optional, since a workspace's ingestion costs more than
# a Pi's backups.
resource "azurerm_monitor_diagnostic_setting" "blob" {
  count                      = var.log_analytics_workspace_id != "" ? 1 : 0
  name                       = "wattbus-backups-blob-logs"
  target_resource_id         = "${azurerm_storage_account.this.id}/blobServices/default"
  log_analytics_workspace_id = var.log_analytics_workspace_id

  enabled_log {
    category = "StorageRead"
  }
  enabled_log {
    category = "StorageWrite"
  }
  enabled_log {
    category = "StorageDelete"
  }
}
