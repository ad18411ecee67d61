locals {
  # The configuration builder/config.py reads; tests/test_terraform.py checks that each
  # name here is one the code reads.
  base_environment = {
    NIXERY_STORAGE_BACKEND = "gcs"
    GCS_BUCKET             = google_storage_bucket.layers.name
    GCS_SIGNING_ACCOUNT    = google_service_account.runtime.email
    GCS_SIGNED_URL_TTL     = tostring(var.signed_url_ttl)

    NIXERY_CACHE_BACKEND        = "firestore"
    FIRESTORE_PROJECT           = var.project
    FIRESTORE_DATABASE          = local.firestore_database
    FIRESTORE_COLLECTION_PREFIX = var.firestore_collection_prefix

    MAX_LAYERS   = tostring(var.max_layers)
    MAX_PACKAGES = tostring(var.max_packages)
    MANIFEST_TTL = tostring(var.manifest_ttl)

    # Cost guards.
    LAYER_EXPIRY_DAYS          = tostring(var.layer_expiry_days)
    COMMIT_TAGS                = var.commit_tags
    BUILDS_PER_CLIENT_PER_HOUR = tostring(var.builds_per_client_per_hour)

    # The runtime has no Nix: a static one is fetched at the first build by store path from
    # the binary cache (signature and NAR hash checked), or from an operator's mirror
    # (NIX_BOOTSTRAP_URL, checked against its SHA-256), and keeps its store in /tmp (the only
    # writable place, held in memory).
    NIX_BOOTSTRAP_STORE_PATH = var.nix_bootstrap_store_path
    NIX_BOOTSTRAP_URL        = var.nix_bootstrap_url
    NIX_BOOTSTRAP_SHA256     = var.nix_bootstrap_sha256
    NIX_SUBSTITUTERS         = var.nix_substituters
    NIX_TRUSTED_PUBLIC_KEYS  = var.nix_trusted_public_keys
    NIX_MAX_JOBS             = var.nix_max_jobs
    NIX_TIMEOUT              = tostring(var.nix_timeout)
    NIX_GC_ABOVE_BYTES       = tostring(var.nix_gc_above_bytes)
    NIX_STORE_ROOT           = "/tmp/nix"
    WORK_DIR                 = "/tmp/nixery"
  }

  memory_mib = tonumber(regex("^[0-9]+", var.memory)) * (endswith(var.memory, "Gi") ? 1024 : 1)

  # functions-framework's server (gunicorn): Python runs one thread at a time per process,
  # so one worker process per vCPU. A request waiting for a build holds its thread, and the
  # kernel may hand every connection to one worker: each worker gets a thread for every request
  # the instance may be sent, so waiting requests never starve warm ones.
  # Builds in different workers meet in the Firestore build lease and the shared Nix store.
  workers = max(1, floor(tonumber(var.cpu)))
  server_environment = {
    WORKERS = tostring(local.workers)
    THREADS = tostring(var.concurrency)
  }

  # Exactly one is set (checked below); the other stays unset rather than empty.
  package_source_environment = {
    NIXERY_CHANNEL   = var.nixpkgs_channel
    NIXERY_PKGS_REPO = var.nixpkgs_repo
  }

  function_environment = merge(
    local.base_environment,
    local.server_environment,
    { for name, value in local.package_source_environment : name => value if value != "" },
    var.extra_environment,
  )
}

# Where the function's build images go, pruned so that redeploys do not pile up storage.
# Unlike the repository Cloud Functions would create on its own, terraform destroy
# removes it.
resource "google_artifact_registry_repository" "builds" {
  #checkov:skip=CKV_GCP_84:Holds only the function's own image, rebuilt from public source on every deploy; Google-managed encryption is enough.
  location      = var.region
  repository_id = "${var.name}-builds"
  description   = "Images of the ${var.name} function's builds."
  format        = "DOCKER"

  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = var.build_images_to_keep
    }
  }
  cleanup_policies {
    id     = "delete-older"
    action = "DELETE"
    condition {
      tag_state  = "ANY"
      older_than = "86400s"
    }
  }

  depends_on = [google_project_service.apis, time_sleep.service_agents]
}

resource "google_cloudfunctions2_function" "registry" {
  #checkov:skip=CKV_GCP_124:A registry for docker and podman anywhere: ingress from the internet is the point (see var.public for who may call it).
  name        = var.name
  location    = var.region
  description = "Nix image registry: container images with exactly the nixpkgs packages named."

  build_config {
    runtime           = var.python_runtime
    entry_point       = "registry"
    service_account   = google_service_account.build.id
    docker_repository = google_artifact_registry_repository.builds.id

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    available_memory                 = var.memory
    available_cpu                    = var.cpu
    timeout_seconds                  = var.timeout_seconds
    max_instance_request_concurrency = var.concurrency
    # Nothing runs, and nothing is billed for compute, while nobody pulls.
    min_instance_count             = 0
    max_instance_count             = var.max_instances
    service_account_email          = google_service_account.runtime.email
    ingress_settings               = "ALLOW_ALL"
    all_traffic_on_latest_revision = true
    environment_variables          = local.function_environment
  }

  lifecycle {
    precondition {
      condition     = (var.nixpkgs_channel != "") != (var.nixpkgs_repo != "")
      error_message = "Set exactly one of nixpkgs_channel and nixpkgs_repo."
    }
    precondition {
      condition     = (var.nix_bootstrap_url == "") == (var.nix_bootstrap_sha256 == "")
      error_message = "Set nix_bootstrap_url and nix_bootstrap_sha256 together (a mirrored Nix and its sha256), or neither (the Nix comes from nix_bootstrap_store_path)."
    }
    precondition {
      # Cloud Run: at most 4 GiB per vCPU; 4 vCPUs need at least 2 GiB, 6 and 8 at least 4 GiB.
      condition     = local.memory_mib <= 4096 * tonumber(var.cpu) && local.memory_mib >= (tonumber(var.cpu) >= 6 ? 4096 : tonumber(var.cpu) >= 4 ? 2048 : 0)
      error_message = "memory ${var.memory} does not fit cpu ${var.cpu}: Cloud Run allows at most 4Gi per vCPU (raise cpu, or lower memory), and at least 2Gi with 4 vCPUs, 4Gi with 6 or 8."
    }
    precondition {
      condition     = var.nix_timeout < var.timeout_seconds
      error_message = "nix_timeout must be below timeout_seconds, or clients see the request cut before the build ends."
    }
  }

  # The build and the first start need their permissions in place, not just requested.
  depends_on = [
    time_sleep.service_agents,
    time_sleep.build_permissions_propagate,
    google_project_iam_member.runtime_cache,
    google_storage_bucket_iam_member.runtime_layers,
    google_service_account_iam_member.runtime_signs_as_itself,
    google_firestore_field.builds_expiry,
    google_firestore_field.facts_expiry,
  ]
}

# Anyone may pull, as from Nixery. Cloud Run checks invocations itself, so the permission
# goes on the service behind the function.
resource "google_cloud_run_v2_service_iam_member" "public" {
  #checkov:skip=CKV_GCP_102:A public registry is the product: anonymous pulls are intended and can be switched off with public = false.
  count = var.public ? 1 : 0

  project  = var.project
  location = google_cloudfunctions2_function.registry.location
  name     = google_cloudfunctions2_function.registry.name
  role     = "roles/run.invoker"
  member   = "allUsers"
}
