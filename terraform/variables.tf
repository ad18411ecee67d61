# --- Where ---------------------------------------------------------------------------

variable "project" {
  description = "Google Cloud project ID to deploy into."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project))
    error_message = "project must be a project ID (6 to 30 lower-case letters, digits or dashes, starting with a letter), not its name or number: see `gcloud projects list`."
  }
}

variable "region" {
  description = "Region of the function, the layer bucket and the function's build images (e.g. us-central1, europe-west1)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a Cloud Functions region such as us-central1 or europe-west1 (not a zone like europe-west1-b, nor a multi-region)."
  }
}

variable "name" {
  description = "Name of the function (and of the Cloud Run service behind it); prefixes the service accounts and the image repository."
  type        = string
  default     = "nixery"

  validation {
    # Service account IDs are at most 30 characters and get a 6-character suffix here.
    condition     = can(regex("^[a-z][a-z0-9-]{2,22}[a-z0-9]$", var.name))
    error_message = "name: 4 to 24 lower-case letters, digits or dashes, starting with a letter."
  }
}

# --- Package source ------------------------------------------------------------------
# Exactly one of the two; Nixery's variables with Nixery's meaning.

variable "nixpkgs_channel" {
  description = "NIXERY_CHANNEL: a nixpkgs channel or branch name (nixos-unstable, nixos-25.05) or a full commit hash to pin nixpkgs. Set to \"\" when nixpkgs_repo is used."
  type        = string
  default     = "nixos-unstable"
}

variable "nixpkgs_repo" {
  description = "NIXERY_PKGS_REPO: a git repository URL holding a package set (a nixpkgs fork, or your own). Leave \"\" to use nixpkgs_channel."
  type        = string
  default     = ""
}

# --- Images --------------------------------------------------------------------------

variable "max_layers" {
  description = "MAX_LAYERS: store-path layers per image (clients reject more than 125 in all)."
  type        = number
  default     = 100

  validation {
    condition     = var.max_layers >= 1 && var.max_layers <= 120
    error_message = "max_layers must be between 1 and 120."
  }
}

variable "max_packages" {
  description = "MAX_PACKAGES: packages one image name may ask for."
  type        = number
  default     = 64
}

variable "manifest_ttl" {
  description = "MANIFEST_TTL: seconds an image built from a moving source (a channel, a branch) is served before it is rebuilt."
  type        = number
  default     = 21600
}

variable "signed_url_ttl" {
  description = "GCS_SIGNED_URL_TTL: seconds a layer download URL stays valid (at most 900)."
  type        = number
  default     = 600

  validation {
    condition     = var.signed_url_ttl >= 60 && var.signed_url_ttl <= 900
    error_message = "signed_url_ttl must be between 60 and 900 seconds."
  }
}

# --- Nix -----------------------------------------------------------------------------

variable "nix_bootstrap_store_path" {
  description = "NIX_BOOTSTRAP_STORE_PATH: the static Nix the function fetches at its first build (the runtime has no Nix), by store path from the first of nix_substituters that has it, verified by its narinfo's signature (nix_trusted_public_keys) and NAR hash. cache.nixos.org keeps every path it has served. Must be a static Nix (nixStatic / pkgsStatic.nix): other builds link against /nix/store and cannot run there. nixpkgs needs Nix 2.18 or newer."
  type        = string
  default     = "/nix/store/vy6a19illla21fmm9shgzgrwxqgpra5j-nix-static-x86_64-unknown-linux-musl-2.28.5"

  validation {
    condition     = can(regex("^/nix/store/[0-9abcdfghijklmnpqrsvwxyz]{32}-nix-[A-Za-z0-9+._?=-]+$", var.nix_bootstrap_store_path))
    error_message = "nix_bootstrap_store_path must be a Nix store path such as /nix/store/<32 base-32 characters>-nix-static-x86_64-unknown-linux-musl-<version>."
  }
}

variable "nix_bootstrap_url" {
  description = "NIX_BOOTSTRAP_URL: an override for operators who mirror the Nix binary: a static Nix (one executable, or a tarball holding bin/nix) fetched instead of nix_bootstrap_store_path. \"\" (the default) uses the store path. Set together with nix_bootstrap_sha256."
  type        = string
  default     = ""

  validation {
    condition     = var.nix_bootstrap_url == "" || can(regex("^https://", var.nix_bootstrap_url))
    error_message = "nix_bootstrap_url must be \"\" (use nix_bootstrap_store_path) or an https:// URL."
  }
}

variable "nix_bootstrap_sha256" {
  description = "NIX_BOOTSTRAP_SHA256: hex SHA-256 of the file at nix_bootstrap_url, checked before it runs (only with nix_bootstrap_url)."
  type        = string
  default     = ""

  validation {
    condition     = var.nix_bootstrap_sha256 == "" || can(regex("^[0-9a-f]{64}$", var.nix_bootstrap_sha256))
    error_message = "nix_bootstrap_sha256 must be 64 lower-case hex digits (the output of sha256sum of the file at nix_bootstrap_url)."
  }
}

variable "nix_substituters" {
  description = "NIX_SUBSTITUTERS: binary caches the function substitutes from (space-separated)."
  type        = string
  default     = "https://cache.nixos.org"
}

variable "nix_trusted_public_keys" {
  description = "NIX_TRUSTED_PUBLIC_KEYS: keys the substituters' signatures are checked against (space-separated)."
  type        = string
  default     = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
}

variable "nix_max_jobs" {
  description = "NIX_MAX_JOBS: local build jobs; \"0\" substitutes only and never compiles (an image whose packages are not in the binary cache fails fast instead of compiling for many minutes)."
  type        = string
  default     = "0"
}

variable "nix_timeout" {
  description = "NIX_TIMEOUT: seconds for one image's Nix work; must stay below timeout_seconds."
  type        = number
  default     = 600
}

variable "nix_gc_above_bytes" {
  description = "NIX_GC_ABOVE_BYTES: after a build, an instance empties its Nix store (in /tmp, which is memory) of everything no running build holds once the store holds more than this (the sizes of its files, measured by walking it: statvfs of /tmp is meaningless under gVisor). Keep it well below memory."
  type        = number
  default     = 1073741824
}

# --- Function sizing -----------------------------------------------------------------

variable "python_runtime" {
  description = "Cloud Functions Python runtime."
  type        = string
  default     = "python312"

  validation {
    condition     = contains(["python311", "python312"], var.python_runtime)
    error_message = "python_runtime must be python311 or python312."
  }
}

variable "memory" {
  description = "Memory of one instance, in Mi or Gi (1Gi to 32Gi; at most 4Gi per vCPU). /tmp (the Nix store and scratch files) lives in memory too, so large closures need more."
  type        = string
  default     = "4Gi"

  validation {
    condition = can(regex("^[0-9]+(Mi|Gi)$", var.memory)) ? (
      tonumber(regex("^[0-9]+", var.memory)) * (endswith(var.memory, "Gi") ? 1024 : 1) >= 1024 &&
      tonumber(regex("^[0-9]+", var.memory)) * (endswith(var.memory, "Gi") ? 1024 : 1) <= 32768
    ) : false
    error_message = "memory must be written like 4Gi or 2048Mi, between 1Gi (Nix and its store in /tmp need it) and 32Gi (Cloud Run's maximum)."
  }
}

variable "cpu" {
  description = "vCPUs of one instance: 1, 2, 4, 6 or 8 (the registry serves several requests at once, which Cloud Run allows from 1 vCPU; one server process per vCPU)."
  type        = string
  default     = "2"

  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.cpu)
    error_message = "cpu must be \"1\", \"2\", \"4\", \"6\" or \"8\" (Cloud Run's whole-vCPU sizes; fractions of a vCPU allow only one request at a time)."
  }
}

variable "timeout_seconds" {
  description = "Request timeout in seconds: a cold image build happens inside the client's manifest request."
  type        = number
  default     = 900

  validation {
    condition     = var.timeout_seconds >= 60 && var.timeout_seconds <= 3600
    error_message = "timeout_seconds must be between 60 and 3600."
  }
}

variable "concurrency" {
  description = "Requests one instance serves at once (max_instance_request_concurrency, 1 to 1000). Blob requests are redirects and cheap; builds share the instance's Nix store."
  type        = number
  default     = 16

  validation {
    condition     = var.concurrency >= 1 && var.concurrency <= 1000 && floor(var.concurrency) == var.concurrency
    error_message = "concurrency must be a whole number from 1 to 1000 (Cloud Run's limit)."
  }
}

variable "max_instances" {
  description = "Upper bound on instances, and so on the bill under load. Instances scale to zero when idle."
  type        = number
  default     = 5

  validation {
    condition     = var.max_instances >= 1 && floor(var.max_instances) == var.max_instances
    error_message = "max_instances must be a whole number of at least 1 (0 would leave nothing to serve pulls)."
  }
}

variable "public" {
  description = "Let anyone pull (allUsers may invoke the service), as Nixery is. false: only principals granted roles/run.invoker can, with an identity token."
  type        = bool
  default     = true
}

# --- Storage and cache ---------------------------------------------------------------

variable "layer_bucket_name" {
  description = "Name of the private layer bucket; \"\" means <project>-<name>-layers. The source bucket is named after it with -source, so at most 56 characters."
  type        = string
  default     = ""

  validation {
    condition     = var.layer_bucket_name == "" || can(regex("^[a-z0-9][a-z0-9_.-]{1,54}[a-z0-9]$", var.layer_bucket_name))
    error_message = "layer_bucket_name must be \"\" or 3 to 56 lower-case letters, digits, dashes, dots or underscores, starting and ending with a letter or digit (GCS allows 63; the source bucket adds -source)."
  }
}

variable "force_destroy_layers" {
  description = "Let terraform destroy delete the layer bucket with its objects. Every object in it is derived data that the registry rebuilds on demand."
  type        = bool
  default     = true
}

variable "create_firestore_database" {
  description = "Create the Firestore database (native mode). false: use an existing native-mode database named firestore_database."
  type        = bool
  default     = true
}

variable "firestore_database" {
  description = "FIRESTORE_DATABASE: the Firestore database ID; \"\" means a database of the registry's own, <name>-cache (a project has many; its location is this module's, and destroy removes only it). \"(default)\" uses the project's default database (its location is tied to the project's default resource location; it is never deleted by destroy)."
  type        = string
  default     = ""

  validation {
    condition     = contains(["", "(default)"], var.firestore_database) || can(regex("^[a-z][a-z0-9-]{2,61}[a-z0-9]$", var.firestore_database))
    error_message = "firestore_database must be \"\" (<name>-cache), \"(default)\", or 4 to 63 lower-case letters, digits or dashes, starting with a letter and ending with a letter or digit."
  }
}

variable "firestore_location" {
  description = "Location of a created Firestore database (a region such as us-central1, or a multi-region such as nam5); \"\" means the function's region."
  type        = string
  default     = ""
}

variable "firestore_deletion_policy" {
  description = "What terraform destroy does to a created Firestore database: DELETE (it only holds the cache) or ABANDON (leave it)."
  type        = string
  default     = "DELETE"

  validation {
    condition     = contains(["DELETE", "ABANDON"], var.firestore_deletion_policy)
    error_message = "firestore_deletion_policy must be DELETE or ABANDON."
  }
}

variable "firestore_collection_prefix" {
  description = "FIRESTORE_COLLECTION_PREFIX: the cache's collections are <prefix>manifests, <prefix>layers, <prefix>builds, <prefix>facts, <prefix>recent-images and <prefix>recent-failures."
  type        = string
  default     = "nixery-"
}

variable "build_images_to_keep" {
  description = "Images of past function builds kept in the function's Artifact Registry repository (older ones are deleted, so redeploys do not pile up storage)."
  type        = number
  default     = 2
}

# --- Cost guards ---------------------------------------------------------------------
# Each is on by default; README's "Cost guards" says what each does.

variable "layer_expiry_days" {
  description = "Layers, image configs and manifests in the layer bucket are deleted this many days after they were written (a bucket lifecycle rule); the registry packs again what a later image needs, and layer records in the cache lapse a day earlier (LAYER_EXPIRY_DAYS). 0 keeps them forever (storage then grows with every distinct image ever requested)."
  type        = number
  default     = 30

  validation {
    condition     = var.layer_expiry_days == 0 || (var.layer_expiry_days >= 2 && floor(var.layer_expiry_days) == var.layer_expiry_days)
    error_message = "layer_expiry_days must be 0 (never) or a whole number of days, at least 2 (layer records lapse a day before their objects)."
  }
}

variable "commit_tags" {
  description = "COMMIT_TAGS: which 40-hex tags (a nixpkgs commit to build from) are served: \"none\" (the default: every commit is a package set to download and evaluate), \"any\", or a space-separated allow-list of commits."
  type        = string
  default     = "none"

  validation {
    condition     = contains(["any", "none"], var.commit_tags) || can(regex("^[0-9a-f]{40}( [0-9a-f]{40})*$", var.commit_tags))
    error_message = "commit_tags must be \"none\", \"any\", or 40-hex commits separated by single spaces."
  }
}

variable "builds_per_client_per_hour" {
  description = "BUILDS_PER_CLIENT_PER_HOUR: image builds (cache misses) one client address may start per hour on one instance; more get 429 TOOMANYREQUESTS with Retry-After. Cached images are never refused. 0 = unbounded."
  type        = number
  default     = 20

  validation {
    condition     = var.builds_per_client_per_hour >= 0 && floor(var.builds_per_client_per_hour) == var.builds_per_client_per_hour
    error_message = "builds_per_client_per_hour must be a whole number, 0 for unbounded."
  }
}

variable "budget_amount" {
  description = "Optional monthly budget for the project, in budget_currency units: alert e-mails to the billing account's administrators at 50%, 90% and 100% of it (actual spend) and at 100% forecast. 0 = no budget. Needs billing_account and the Billing Account Administrator or Costs Manager role on it."
  type        = number
  default     = 0

  validation {
    condition     = var.budget_amount >= 0
    error_message = "budget_amount must be 0 (no budget) or a positive amount."
  }
}

variable "budget_currency" {
  description = "Currency of budget_amount: the billing account's currency (ISO 4217, e.g. USD, EUR)."
  type        = string
  default     = "USD"

  validation {
    condition     = can(regex("^[A-Z]{3}$", var.budget_currency))
    error_message = "budget_currency must be a three-letter ISO 4217 code such as USD or EUR, the billing account's currency."
  }
}

variable "billing_account" {
  description = "The billing account ID (XXXXXX-XXXXXX-XXXXXX, see `gcloud billing accounts list`) the budget goes on; only with budget_amount."
  type        = string
  default     = ""

  validation {
    condition     = var.billing_account == "" || can(regex("^[0-9A-F]{6}-[0-9A-F]{6}-[0-9A-F]{6}$", var.billing_account))
    error_message = "billing_account must be \"\" or an ID like 012345-6789AB-CDEF01 (gcloud billing accounts list)."
  }
}

variable "extra_environment" {
  description = "More environment variables for the function (see builder/config.py), e.g. { ALWAYS_INCLUDE = \"cacert\" }. They override the ones this module sets."
  type        = map(string)
  default     = {}
}
