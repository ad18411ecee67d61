# Every API the deployment touches. They stay enabled on destroy: other things in the
# project may rely on them, and disabling an API is what breaks a shared project.
locals {
  services = toset([
    "artifactregistry.googleapis.com", # images of the function's builds
    "cloudbuild.googleapis.com",       # builds the function from its source archive
    "cloudfunctions.googleapis.com",
    "firestore.googleapis.com",      # the build cache
    "iam.googleapis.com",            # service accounts
    "iamcredentials.googleapis.com", # signBlob for signed layer URLs
    "logging.googleapis.com",
    "run.googleapis.com", # 2nd-gen functions run as Cloud Run services
    "storage.googleapis.com",
  ])
}

resource "google_project_service" "apis" {
  for_each = local.services

  project            = var.project
  service            = each.value
  disable_on_destroy = false
}
