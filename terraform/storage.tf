locals {
  layer_bucket_name = var.layer_bucket_name != "" ? var.layer_bucket_name : "${var.project}-${var.name}-layers"

  # What expires by age (layer_expiry_days): blobs (builder/storage/gcs.py, BLOB_PREFIX:
  # layers, configs, manifests) and the layer index (INDEX_PREFIX), written with each layer.
  layer_expiring_prefixes = ["blobs/", "layers/"]

  # Where the GCS storage backend (builder/storage/gcs.py, UPLOAD_PREFIX) streams a
  # layer before copying it to its digest name. An upload cut short (an instance
  # stopped mid-build) can leave its temporary object behind.
  layer_temporary_prefix = "uploads/"
}

# Layers and image configs, named by digest. Private: clients download them through
# short-lived signed URLs the function hands out, never from a public bucket.
resource "google_storage_bucket" "layers" {
  #checkov:skip=CKV_GCP_62:Access logs would be written per layer download; Cloud Audit Logs already cover admin access, and the function logs every request.
  #checkov:skip=CKV_GCP_78:Objects are content-addressed and never overwritten; versioning would only keep deleted temporaries and bill for them.
  name                        = local.layer_bucket_name
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_layers

  # Deleted objects are derived data: keeping them soft-deleted for a week only costs.
  soft_delete_policy {
    retention_duration_seconds = 0
  }

  lifecycle_rule {
    condition {
      age            = 1
      matches_prefix = [local.layer_temporary_prefix]
    }
    action {
      type = "Delete"
    }
  }

  # Cost guard: storage does not grow with every distinct image ever requested. An image
  # whose layer is gone is rebuilt at its next pull (the registry heals lost blobs).
  dynamic "lifecycle_rule" {
    for_each = var.layer_expiry_days > 0 ? [var.layer_expiry_days] : []
    content {
      condition {
        age            = lifecycle_rule.value
        matches_prefix = local.layer_expiring_prefixes
      }
      action {
        type = "Delete"
      }
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.layer_bucket_name) <= 56
      error_message = "The layer bucket would be named ${local.layer_bucket_name} (${length(local.layer_bucket_name)} characters); with the source bucket's -source that passes GCS's 63. Shorten var.name or set layer_bucket_name to at most 56 characters."
    }
  }

  depends_on = [google_project_service.apis]
}

# The function's source archives. Cloud Functions copies the archive at deploy time.
resource "google_storage_bucket" "source" {
  #checkov:skip=CKV_GCP_62:Holds only the deployment archives terraform uploads; Cloud Audit Logs cover access.
  #checkov:skip=CKV_GCP_78:Each archive is named by its content hash and never overwritten.
  name                        = "${local.layer_bucket_name}-source"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true

  soft_delete_policy {
    retention_duration_seconds = 0
  }

  depends_on = [google_project_service.apis]
}

locals {
  repo_root = abspath("${path.module}/..")

  # Exactly what the function runs: its entry point, its requirements, the package and
  # the bundled Nix expressions. Tests, benchmarks and local state stay out of it.
  source_files = sort(concat(
    ["main.py", "requirements.txt"],
    [
      for f in setunion(fileset(local.repo_root, "builder/**"), fileset(local.repo_root, "nix/**")) : f
      if !strcontains(f, "__pycache__") && !endswith(f, ".pyc")
    ],
  ))
}

# Files are added with fixed timestamps, so the archive (and its hash) changes only when
# a file does.
data "archive_file" "source" {
  type        = "zip"
  output_path = "${path.module}/.build/source.zip"

  dynamic "source" {
    for_each = toset(local.source_files)
    content {
      filename = source.value
      content  = file("${local.repo_root}/${source.value}")
    }
  }
}

# Named by content: a code change is a new object, and the new name redeploys the function.
resource "google_storage_bucket_object" "source" {
  name         = "source/${data.archive_file.source.output_sha256}.zip"
  bucket       = google_storage_bucket.source.name
  source       = data.archive_file.source.output_path
  content_type = "application/zip"
}
