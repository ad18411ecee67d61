locals {
  # Registry clients need the registry at the root of a host: the run.app address of the
  # service, not the path-based cloudfunctions.net one.
  registry_host = trimsuffix(trimprefix(google_cloudfunctions2_function.registry.service_config[0].uri, "https://"), "/")
}

output "registry_host" {
  description = "The registry's host name: image names are <host>/<package>/<package>..."
  value       = local.registry_host
}

output "pull_command" {
  description = "A first image to pull (the first pull builds it and takes longer)."
  value       = "docker pull ${local.registry_host}/shell/hello"
}

output "layer_bucket" {
  description = "The private bucket holding layers and image configs."
  value       = google_storage_bucket.layers.name
}

output "service_account" {
  description = "The identity the registry runs as."
  value       = google_service_account.runtime.email
}

output "firestore_database" {
  description = "The Firestore database holding the build cache."
  value       = local.firestore_database
}
