locals {
  # A database of the registry's own by default: its location is ours to choose (the
  # "(default)" database's is tied to the project's default resource location), IAM can be
  # conditioned on it, and destroy removes nothing another application uses.
  firestore_database_id = var.firestore_database != "" ? var.firestore_database : "${var.name}-cache"
}

resource "google_firestore_database" "cache" {
  count = var.create_firestore_database ? 1 : 0

  project     = var.project
  name        = local.firestore_database_id
  location_id = var.firestore_location != "" ? var.firestore_location : var.region
  type        = "FIRESTORE_NATIVE"
  # "(default)" may hold other applications' data by the time of a destroy: never deleted.
  deletion_policy = local.firestore_database_id == "(default)" ? "ABANDON" : var.firestore_deletion_policy

  depends_on = [google_project_service.apis]
}

locals {
  firestore_database = var.create_firestore_database ? google_firestore_database.cache[0].name : local.firestore_database_id
}

# The cache collections whose documents expire (builder/cache): built images, build
# leases, facts (channel commits, package resolutions, closure facts), and the front
# page's recent images and failures. Firestore deletes a document some time (typically
# within a day) after its expires_at passes; readers already treat expired records as absent, so this only keeps
# the collections from growing.
resource "google_firestore_field" "manifests_expiry" {
  project    = var.project
  database   = local.firestore_database
  collection = "${var.firestore_collection_prefix}manifests"
  field      = "expires_at"

  ttl_config {}
}

# After the first, so the two field operations on one database do not overlap.
resource "google_firestore_field" "builds_expiry" {
  project    = var.project
  database   = local.firestore_database
  collection = "${var.firestore_collection_prefix}builds"
  field      = "expires_at"

  ttl_config {}

  depends_on = [google_firestore_field.manifests_expiry]
}

# Layer records (LAYER_EXPIRY_DAYS), so they lapse with the objects they name.
resource "google_firestore_field" "layers_expiry" {
  project    = var.project
  database   = local.firestore_database
  collection = "${var.firestore_collection_prefix}layers"
  field      = "expires_at"

  ttl_config {}

  depends_on = [google_firestore_field.facts_expiry]
}

resource "google_firestore_field" "facts_expiry" {
  project    = var.project
  database   = local.firestore_database
  collection = "${var.firestore_collection_prefix}facts"
  field      = "expires_at"

  ttl_config {}

  depends_on = [google_firestore_field.builds_expiry]
}

# The front page's listings (builder/page.py): recent images and recent failures.
resource "google_firestore_field" "recent_images_expiry" {
  project    = var.project
  database   = local.firestore_database
  collection = "${var.firestore_collection_prefix}recent-images"
  field      = "expires_at"

  ttl_config {}

  depends_on = [google_firestore_field.layers_expiry]
}

resource "google_firestore_field" "recent_failures_expiry" {
  project    = var.project
  database   = local.firestore_database
  collection = "${var.firestore_collection_prefix}recent-failures"
  field      = "expires_at"

  ttl_config {}

  depends_on = [google_firestore_field.recent_images_expiry]
}
