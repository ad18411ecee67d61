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

# Enabling Cloud Functions, Cloud Run and Cloud Build creates their service agents
# (service-<number>@gcf-admin-robot..., @serverless-robot-prod..., @gcp-sa-cloudbuild...)
# and grants them their roles, but that finishes some time after the API reports enabled;
# a function created at once can fail with "service agent ... does not exist" or a
# permission error of the agent. (google_project_service_identity, which would create
# them explicitly, is only in the google-beta provider.) Wait for them before anything
# that needs them.
resource "time_sleep" "service_agents" {
  create_duration = "90s"

  triggers = {
    apis = join(",", sort([for api in google_project_service.apis : api.service]))
  }
}
