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

# The build cache in Firestore.
resource "google_project_iam_member" "runtime_cache" {
  project = var.project
  role    = "roles/datastore.user"
  member  = google_service_account.runtime.member
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

# The roles Google documents for a function's build account: write the build log; read
# the source Cloud Functions stages in a bucket it creates and names itself, which is why
# object access is granted on the project rather than on one bucket; push the image and
# the build cache image (writer on the function's own repository only).
resource "google_project_iam_member" "build_logs" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = google_service_account.build.member
}

resource "google_project_iam_member" "build_objects" {
  project = var.project
  role    = "roles/storage.objectAdmin"
  member  = google_service_account.build.member
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
    objects = google_project_iam_member.build_objects.id
    image   = google_artifact_registry_repository_iam_member.build_pushes_image.id
  }
}
