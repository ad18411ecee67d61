# The identity the registry runs as, with exactly what it needs and nothing project-wide
# beyond the cache.
resource "google_service_account" "runtime" {
  account_id   = "${var.name}-run"
  display_name = "Nix image registry (${var.name}), runtime"
  description  = "Runs the ${var.name} function: reads and writes layers, the build cache, signs layer URLs."

  depends_on = [google_project_service.apis]
}

# Layers: read, write, and the move from the temporary name to the digest name.
resource "google_storage_bucket_iam_member" "runtime_layers" {
  bucket = google_storage_bucket.layers.name
  role   = "roles/storage.objectAdmin"
  member = google_service_account.runtime.member
}

# The build cache in Firestore: documents of its one database only. Firestore roles are
# granted on the project; an IAM condition on the database's resource name narrows this
# one to the registry's database (another application's database, or "(default)" when it
# is not ours, stays out of reach).
resource "google_project_iam_member" "runtime_cache" {
  project = var.project
  role    = "roles/datastore.user"
  member  = google_service_account.runtime.member

  condition {
    title       = "${var.name}-cache-database-only"
    description = "Only the ${var.name} registry's Firestore database."
    expression  = "resource.name == \"projects/${var.project}/databases/${local.firestore_database}\""
  }
}

# Signed URLs: a function has no private key, so it signs through the IAM signBlob API
# as itself.
resource "google_service_account_iam_member" "runtime_signs_as_itself" {
  service_account_id = google_service_account.runtime.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = google_service_account.runtime.member
}

# The identity Cloud Build uses to turn the source archive into the function's image. A
# dedicated one, because projects created since 2024 no longer give the default build
# account these permissions, and a deploy should not depend on the project's age.
resource "google_service_account" "build" {
  account_id   = "${var.name}-build"
  display_name = "Nix image registry (${var.name}), function builds"
  description  = "Builds the ${var.name} function's image from its source archive."

  depends_on = [google_project_service.apis]
}

# The roles Google documents for a function's build account: write the build log; object
# admin for the source; push the image and the build cache image (writer on the function's
# own repository only). Cloud Functions copies the source archive into a bucket it creates
# and names itself, gcf-v2-sources-<project number>-<region>, and the build works there:
# object admin is granted on the project with a condition naming that one bucket, so the
# build account can neither read nor write any other bucket, and in particular cannot touch
# the layers every client pulls.
resource "google_project_iam_member" "build_logs" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = google_service_account.build.member
}

locals {
  function_sources_bucket = "projects/_/buckets/gcf-v2-sources-${google_storage_bucket.source.project_number}-${var.region}"
}

resource "google_project_iam_member" "build_reads_sources" {
  project = var.project
  role    = "roles/storage.objectAdmin"
  member  = google_service_account.build.member

  condition {
    title       = "${var.name}-function-sources-only"
    description = "Only the bucket Cloud Functions stages this region's function sources in."
    expression  = "resource.name == \"${local.function_sources_bucket}\" || resource.name.startsWith(\"${local.function_sources_bucket}/\")"
  }
}

# And our own archive, where Cloud Functions takes it from.
resource "google_storage_bucket_iam_member" "build_reads_own_source" {
  bucket = google_storage_bucket.source.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.build.member
}

resource "google_artifact_registry_repository_iam_member" "build_pushes_image" {
  project    = var.project
  location   = google_artifact_registry_repository.builds.location
  repository = google_artifact_registry_repository.builds.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.build.member
}

# IAM grants take a while to reach every service; a build started at once can be refused
# the source it was just allowed to read. Google's own example for build accounts waits
# the same way.
resource "time_sleep" "build_permissions_propagate" {
  create_duration = "60s"

  triggers = {
    logs    = google_project_iam_member.build_logs.id
    sources = google_project_iam_member.build_reads_sources.id
    own     = google_storage_bucket_iam_member.build_reads_own_source.id
    image   = google_artifact_registry_repository_iam_member.build_pushes_image.id
  }
}
