terraform {
  required_version = ">= 1.5"

  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.0"
    }
    # A SAS with a fixed lifetime that is renewed on a schedule, not at every `plan`.
    time = {
      source  = "hashicorp/time"
      version = "~> 0.12"
    }
  }
}

provider "azurerm" {
  features {}
  # Containers and the lifecycle policy are managed through Azure AD, so the account's shared
  # key can be turned off (var.shared_key_enabled) when the Pi uses a service principal.
  storage_use_azuread = true
}
