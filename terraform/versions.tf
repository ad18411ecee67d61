terraform {
  # strcontains() and endswith() in the source archive need 1.5.
  required_version = ">= 1.5.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "8.0.0"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "2.7.1"
    }
    http = {
      source  = "hashicorp/http"
      version = "3.6.1"
    }
    time = {
      source  = "hashicorp/time"
      version = "0.13.1"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}
