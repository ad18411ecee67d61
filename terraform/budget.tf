# Optional: a monthly budget on the project with e-mail alerts to the billing account's
# administrators (budget_amount > 0). Budgets live on the billing account, so this needs a
# role there, and the Billing Budgets API bills its calls to this project.
provider "google" {
  alias                 = "billing"
  project               = var.project
  region                = var.region
  user_project_override = true
  billing_project       = var.project
}

resource "google_billing_budget" "project" {
  count    = var.budget_amount > 0 ? 1 : 0
  provider = google.billing

  billing_account = var.billing_account
  display_name    = "${var.name} registry (${var.project})"

  budget_filter {
    projects = ["projects/${google_storage_bucket.source.project_number}"]
  }

  amount {
    specified_amount {
      currency_code = var.budget_currency
      units         = tostring(floor(var.budget_amount))
    }
  }

  threshold_rules {
    threshold_percent = 0.5
  }
  threshold_rules {
    threshold_percent = 0.9
  }
  threshold_rules {
    threshold_percent = 1.0
  }
  threshold_rules {
    threshold_percent = 1.0
    spend_basis       = "FORECASTED_SPEND"
  }

  lifecycle {
    precondition {
      condition     = var.billing_account != ""
      error_message = "budget_amount needs billing_account: the ID of the billing account the project is linked to (gcloud billing projects describe ${var.project})."
    }
  }

  depends_on = [google_project_service.apis]
}
