output "storage_account_name" {
  description = "[backup_rotator.storage] account"
  value       = azurerm_storage_account.this.name
}

output "container_name" {
  description = "[backup_rotator.storage] container"
  value       = azurerm_storage_container.backups.name
}

output "blob_endpoint" {
  value = azurerm_storage_account.this.primary_blob_endpoint
}

output "sas_token" {
  description = "The container SAS for [backup_rotator.storage] sas_file: terraform output -raw sas_token > secrets/backup_sas"
  value       = var.shared_key_enabled ? data.azurerm_storage_account_blob_container_sas.backups[0].sas : null
  sensitive   = true
}

output "sas_expiry" {
  description = "When the SAS stops working: run terraform apply before then (it renews after sas_renew_after_days) and replace the file."
  value       = var.shared_key_enabled ? data.azurerm_storage_account_blob_container_sas.backups[0].expiry : null
}

output "wattbus_toml" {
  description = "The [backup_rotator.storage] section for wattbus.toml."
  value       = <<-EOT
    [backup_rotator.storage]
    kind = "azure"
    account = "${azurerm_storage_account.this.name}"
    container = "${azurerm_storage_container.backups.name}"
    sas_file = "/run/secrets/backup_sas"
  EOT
}
