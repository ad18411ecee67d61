# Every API the deployment touches. They stay enabled on destroy: other things in the
# project may rely on them, and disabling an API is what breaks a shared project.
locals {
  services = setunion([
    "artifactregistry.googleapis.com", # images of the function's builds
    "cloudbuild.googleapis.com",       # builds the function from its source archive
    "cloudfunctions.googleapis.com",
    # google_project_iam_member reads and writes the project's IAM policy through it; a new
    # project, or credentials that bill this project (CI, service accounts), need it enabled.
    "cloudresourcemanager.googleapis.com",
    "firestore.googleapis.com",      # the build cache
    "iam.googleapis.com",            # service accounts
    "iamcredentials.googleapis.com", # signBlob for signed layer URLs
    "logging.googleapis.com",
    "run.googleapis.com", # 2nd-gen functions run as Cloud Run services
    "storage.googleapis.com",
  ], var.budget_amount > 0 ? ["billingbudgets.googleapis.com"] : [])
}

resource "google_project_service" "apis" {
  for_each = local.services

  project            = var.project
  service            = each.value
  disable_on_destroy = false
}

# The service agents the deployment relies on: Cloud Functions' (service-<number>@gcf-admin-robot...),
# Cloud Run's (@serverless-robot-prod...), Cloud Build's (@gcp-sa-cloudbuild...) and Artifact
# Registry's (@gcp-sa-artifactregistry...). Enabling an API creates its agent eventually; a
# function created at once can fail with "service agent ... does not exist". Service Usage's
# generateServiceIdentity creates an agent now, or returns the existing one (the call is
# idempotent: gcloud's `services identity create` and firebase-tools make the same one). The
# google provider has no resource for it (google_project_service_identity is only in
# google-beta), so the module makes the call itself.
locals {
  service_agent_apis = toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "run.googleapis.com",
  ])
}

# The credentials terraform runs with: the same identity and token the google provider uses.
data "google_client_config" "current" {}

data "http" "service_agent" {
  for_each = local.service_agent_apis

  url    = "https://serviceusage.googleapis.com/v1beta1/projects/${var.project}/services/${each.key}:generateServiceIdentity"
  method = "POST"
  request_headers = {
    Authorization = "Bearer ${data.google_client_config.current.access_token}"
    # User credentials (gcloud auth application-default login) need a project to bill the call to.
    "X-Goog-User-Project" = var.project
  }
  # 429 and 5xx (an API enabled seconds ago answers those for a while) are retried.
  retry {
    attempts     = 6
    min_delay_ms = 2000
    max_delay_ms = 20000
  }

  depends_on = [google_project_service.apis]

  lifecycle {
    postcondition {
      condition     = self.status_code == 200
      error_message = "Creating the service agent of ${each.key} failed (HTTP ${self.status_code}): ${self.response_body}"
    }
  }
}

# Granting an agent its role finishes some time after the agent exists: wait before anything
# that needs the agents (the function's build, its Artifact Registry repository).
resource "time_sleep" "service_agents" {
  create_duration = "90s"

  triggers = {
    apis = join(",", sort([for api in google_project_service.apis : api.service]))
  }

  depends_on = [data.http.service_agent]
}
