"""The terraform module against the code it deploys.

Terraform and the Python code meet only through names: environment variables,
the entry point, Firestore collections and fields, the bucket's temporary
prefix. These tests parse the HCL with python-hcl2, read the Python side from its
declarations (builder/config.py's settings, the cache records, `ast` for constants) and check that the names agree, plus the security properties the
deployment promises (private bucket, least-privilege identity, scale to zero).
The offline tool checks (terraform fmt, checkov, terraform validate) live in
scripts/check-terraform.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import hcl2
import pytest

from builder.cache import BuildLease, BuiltImage, Fact, FailedBuild, ImageRecord, LayerRecord
from builder.config import SETTINGS, Config

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM = ROOT / "terraform"
BUILDER = ROOT / "builder"

# Settings without a default, yet deliberately not set by terraform.
NOT_SET_BY_TERRAFORM = {
    "NIXERY_PKGS_PATH": "a package set on the local disk; the cloud uses a channel or a repository",
    "NIX_BIN_DIR": "where Nix lives; the function bootstraps its own from NIX_BOOTSTRAP_STORE_PATH",
    "GOOGLE_CLOUD_PROJECT": "fallback for FIRESTORE_PROJECT, which terraform sets",
    "STORAGE_EMULATOR_HOST": "tests only: the cloud talks to Google's endpoint",
    "GOOGLE_APPLICATION_CREDENTIALS": "the function runs as its service account, with no key file",
}
# Alternatives: terraform sets exactly one of them (a precondition enforces it).
PACKAGE_SOURCES = {"NIXERY_CHANNEL", "NIXERY_PKGS_REPO"}

RUNTIME_MEMBER = "${google_service_account.runtime.member}"


# --- parsing -------------------------------------------------------------------------


@cache
def terraform() -> dict[str, list[dict[str, Any]]]:
    """All .tf files of the module, merged by top-level block type."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as f:
            for kind, blocks in hcl2.load(f).items():
                merged.setdefault(kind, []).extend(blocks)
    return merged


def resources(kind: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for block in terraform().get("resource", []):
        for name, body in block.get(kind, {}).items():
            found[name] = body
    return found


def resource(kind: str, name: str) -> dict[str, Any]:
    found = resources(kind)
    assert name in found, f"terraform has no {kind}.{name}"
    return found[name]


def all_resources() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for block in terraform().get("resource", []):
        for kind, named in block.items():
            for name, body in named.items():
                yield kind, name, body


def local(name: str) -> Any:
    for block in terraform().get("locals", []):
        if name in block:
            return block[name]
    raise AssertionError(f"terraform has no local.{name}")


def variables() -> dict[str, dict[str, Any]]:
    return {name: body for block in terraform()["variable"] for name, body in block.items()}


def output(name: str) -> dict[str, Any]:
    for block in terraform().get("output", []):
        if name in block:
            return block[name]
    raise AssertionError(f"terraform has no output {name}")


def one(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(blocks) == 1, blocks
    return blocks[0]


def function() -> dict[str, Any]:
    return resource("google_cloudfunctions2_function", "registry")


def environment() -> dict[str, Any]:
    """Every variable terraform may give the function (the package sources conditionally)."""
    return {**local("base_environment"), **local("package_source_environment")}


def resolve(expression: Any) -> str:
    """A value as the function would see it with the variables' defaults; references to
    resources become placeholders."""
    defaults = {name: body.get("default") for name, body in variables().items()}
    if not isinstance(expression, str):
        return str(expression)
    match = re.fullmatch(r"\$\{(?:tostring\()?var\.(\w+)\)?\}", expression)
    if match:
        return str(defaults[match.group(1)])
    if "${" in expression:
        return "placeholder"
    return expression


# --- environment ---------------------------------------------------------------------


def test_every_variable_terraform_sets_is_a_declared_setting():
    unknown = sorted(set(environment()) - set(SETTINGS))
    assert not unknown, f"terraform sets variables builder/config.py does not declare (typos?): {unknown}"


def test_every_setting_without_a_default_is_set_by_terraform():
    needed = {variable for variable, f in SETTINGS.items() if f.default is None}
    missing = sorted(needed - set(environment()) - set(NOT_SET_BY_TERRAFORM))
    assert not missing, f"settings without a default that terraform does not set: {missing}"
    assert set(NOT_SET_BY_TERRAFORM) <= needed, "stale exception list"


def test_the_function_gets_the_whole_environment():
    env = one(function()["service_config"])["environment_variables"]
    assert env == "${local.function_environment}"
    merged = local("function_environment")
    for part in ("local.base_environment", "local.server_environment", "local.package_source_environment",
                 "var.extra_environment"):
        assert part in merged


def test_the_server_uses_every_vcpu_and_serves_the_instance_concurrency():
    # functions-framework reads WORKERS and THREADS; one Python process per vCPU.
    server = local("server_environment")
    assert set(server) == {"WORKERS", "THREADS"}
    assert local("workers") == "${max(1, floor(tonumber(var.cpu)))}"
    assert server["WORKERS"] == "${tostring(local.workers)}"
    # Every worker can hold every request of the instance: waiting builds never starve warm requests.
    assert server["THREADS"] == "${tostring(var.concurrency)}"
    assert (int(resolve("${var.cpu}")), int(resolve("${var.concurrency}"))) == (2, 16)


def test_exactly_one_package_source_by_default():
    env = {name: resolve(value) for name, value in local("package_source_environment").items()}
    assert set(env) == PACKAGE_SOURCES
    assert sum(1 for value in env.values() if value) == 1
    preconditions = one(function()["lifecycle"])["precondition"]
    assert any("nixpkgs_channel" in p["condition"] and "nixpkgs_repo" in p["condition"] for p in preconditions)


def test_the_defaults_make_a_valid_cloud_configuration():
    env = {name: resolve(value) for name, value in environment().items() if resolve(value)}
    config = Config.from_env(env)  # raises on a value the code rejects
    assert config.storage_backend == "gcs"
    assert config.cache_backend == "firestore"
    assert config.gcs_public is False  # the bucket is private: layers go out through signed URLs
    assert config.channel and not config.pkgs_repo and not config.pkgs_path
    assert config.nix_max_jobs == "0"
    assert config.nix_substituters == "https://cache.nixos.org"
    assert config.nix_trusted_public_keys == "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
    assert config.work_dir == "/tmp/nixery" and config.nix_store == "/tmp/nix"
    # /tmp is memory on the function: the store is collected long before the instance runs out.
    memory = resolve(one(function()["service_config"])["available_memory"])
    assert memory.endswith("Gi") and 0 < config.nix_gc_above_bytes <= int(memory[:-2]) * 2**30 // 2
    assert config.firestore_prefix == Config.firestore_prefix
    assert config.nix_timeout < int(resolve(one(function()["service_config"])["timeout_seconds"]))


def test_nix_bootstrap_is_pinned_by_store_path_on_the_trusted_cache():
    env = environment()
    store_path = resolve(env["NIX_BOOTSTRAP_STORE_PATH"])
    # One fixed path of nixpkgs' static Nix (nixStatic), new enough for nixpkgs (>= 2.18).
    match = re.fullmatch(r"/nix/store/[0-9a-df-np-sv-z]{32}-nix-static-x86_64-unknown-linux-musl-(\d+)\.(\d+)\.\d+",
                         store_path)
    assert match and (int(match.group(1)), int(match.group(2))) >= (2, 18), store_path
    # It comes from the substituter the builds use, verified by the key they trust.
    assert resolve(env["NIX_SUBSTITUTERS"]) == "https://cache.nixos.org"
    # The mirror override is off by default, and only comes with its checksum.
    assert resolve(env["NIX_BOOTSTRAP_URL"]) == "" and resolve(env["NIX_BOOTSTRAP_SHA256"]) == ""
    preconditions = one(function()["lifecycle"])["precondition"]
    assert any("nix_bootstrap_url" in p["condition"] and "nix_bootstrap_sha256" in p["condition"]
               for p in preconditions)


# --- Firestore -----------------------------------------------------------------------


def test_ttl_policies_match_the_cache_records():
    fields = resources("google_firestore_field")
    expiring = {body["collection"]: body for body in fields.values() if "ttl_config" in body}
    prefix = "${var.firestore_collection_prefix}"
    assert set(expiring) == {prefix + c for c in ("manifests", "builds", "facts", "layers", "recent-images",
                                                  "recent-failures")}
    for body in expiring.values():
        assert body["field"] == "expires_at"
        assert body["database"] == "${local.firestore_database}"
    # The field the records carry, for images and for build leases.
    assert "expires_at" in {f.name for f in dataclasses.fields(ImageRecord)}
    assert "expires_at" in {f.name for f in dataclasses.fields(BuildLease)}
    assert "expires_at" in {f.name for f in dataclasses.fields(Fact)}
    assert "expires_at" in {f.name for f in dataclasses.fields(LayerRecord)}
    assert "expires_at" in {f.name for f in dataclasses.fields(BuiltImage)}
    assert "expires_at" in {f.name for f in dataclasses.fields(FailedBuild)}
    assert variables()["firestore_collection_prefix"]["default"] == Config.firestore_prefix
    assert environment()["FIRESTORE_COLLECTION_PREFIX"] == "${var.firestore_collection_prefix}"


def test_firestore_backend_uses_these_collections():
    path = BUILDER / "cache" / "firestore.py"
    if not path.exists():
        pytest.skip("builder/cache/firestore.py is not written yet")
    strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert {"manifests", "builds", "facts", "recent-images", "recent-failures", "expires_at"} <= strings


def test_firestore_database_is_native_mode():
    database = resource("google_firestore_database", "cache")
    assert database["type"] == "FIRESTORE_NATIVE"


def test_firestore_is_a_database_of_the_modules_own_by_default_and_default_remains_possible():
    assert variables()["firestore_database"]["default"] == ""
    assert local("firestore_database_id") == (
        '${var.firestore_database != "" ? var.firestore_database : "${var.name}-cache"}')
    database = resource("google_firestore_database", "cache")
    assert database["name"] == "${local.firestore_database_id}"
    # "(default)" may be shared by the time of a destroy: never deleted.
    assert database["deletion_policy"] == (
        '${local.firestore_database_id == "(default)" ? "ABANDON" : var.firestore_deletion_policy}')
    condition = one(variables()["firestore_database"]["validation"])["condition"]
    assert "(default)" in condition
    # The code's own default stays "(default)" (local runs, the emulator); terraform always sets it.
    assert Config.firestore_database == "(default)"
    assert environment()["FIRESTORE_DATABASE"] == "${local.firestore_database}"


def test_the_runtime_reaches_only_its_own_firestore_database():
    grant = resource("google_project_iam_member", "runtime_cache")
    condition = one(grant["condition"])
    assert condition["expression"] == (
        'resource.name == "projects/${var.project}/databases/${local.firestore_database}"')


# --- storage -------------------------------------------------------------------------


@pytest.mark.parametrize("bucket", ["layers", "source"])
def test_buckets_are_private(bucket):
    body = resource("google_storage_bucket", bucket)
    assert body["uniform_bucket_level_access"] is True
    assert body["public_access_prevention"] == "enforced"
    members = [b["member"] for b in resources("google_storage_bucket_iam_member").values()]
    assert not {"allUsers", "allAuthenticatedUsers"} & set(members)


def gcs_constant(name: str) -> str:
    """A module-level constant of the GCS storage backend."""
    tree = ast.parse((BUILDER / "storage" / "gcs.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"builder/storage/gcs.py has no {name}")


def test_abandoned_temporaries_are_removed():
    prefix = local("layer_temporary_prefix")
    assert prefix == gcs_constant("UPLOAD_PREFIX")
    assert prefix.endswith("/") and not gcs_constant("BLOB_PREFIX").startswith(prefix)  # never published blobs
    rules = resource("google_storage_bucket", "layers")["lifecycle_rule"]
    deletes = [r for r in rules if one(r["action"])["type"] == "Delete"]
    assert len(deletes) == 1
    condition = one(deletes[0]["condition"])
    assert condition["matches_prefix"] == ["${local.layer_temporary_prefix}"]
    assert condition["age"] == 1


def test_layer_objects_expire_by_age_by_default_and_their_records_a_day_earlier():
    [rule] = resource("google_storage_bucket", "layers")["dynamic"]
    content = one(rule["lifecycle_rule"]["content"])
    for_each = rule["lifecycle_rule"]["for_each"]
    assert for_each.startswith("${var.layer_expiry_days > 0 ?") and for_each.endswith(": []}")  # 0: off
    condition = one(content["condition"])
    assert condition["age"] == "${lifecycle_rule.value}"
    assert condition["matches_prefix"] == "${local.layer_expiring_prefixes}"
    assert one(content["action"])["type"] == "Delete"
    expiring = local("layer_expiring_prefixes")
    for constant in ("BLOB_PREFIX", "INDEX_PREFIX"):  # a layer's blob and its index entry go together
        assert any(gcs_constant(constant).startswith(prefix) for prefix in expiring), constant
    assert not any(gcs_constant("UPLOAD_PREFIX").startswith(prefix) for prefix in expiring)
    assert variables()["layer_expiry_days"]["default"] == 30
    assert environment()["LAYER_EXPIRY_DAYS"] == "${tostring(var.layer_expiry_days)}"
    config = Config.from_env({"LAYER_EXPIRY_DAYS": "30"})
    assert config.layer_record_ttl == 29 * 86400
    assert Config.from_env({"LAYER_EXPIRY_DAYS": "0"}).layer_record_ttl is None


def test_cost_guards_are_on_by_default():
    defaults = {name: body.get("default") for name, body in variables().items()}
    assert defaults["commit_tags"] == "none" and environment()["COMMIT_TAGS"] == "${var.commit_tags}"
    assert defaults["builds_per_client_per_hour"] > 0
    assert environment()["BUILDS_PER_CLIENT_PER_HOUR"] == "${tostring(var.builds_per_client_per_hour)}"
    env = {name: resolve(value) for name, value in environment().items() if resolve(value)}
    config = Config.from_env(env)
    assert not config.commit_tag_allowed("0" * 40)
    assert config.builds_per_client_per_hour == defaults["builds_per_client_per_hour"]


def test_the_budget_alert_is_optional_and_needs_a_billing_account():
    budget = resource("google_billing_budget", "project")
    assert budget["count"] == "${var.budget_amount > 0 ? 1 : 0}"
    assert variables()["budget_amount"]["default"] == 0
    assert one(budget["budget_filter"])["projects"] == ["projects/${google_storage_bucket.source.project_number}"]
    assert [r["threshold_percent"] for r in budget["threshold_rules"]] == [0.5, 0.9, 1.0, 1.0]
    [precondition] = one(budget["lifecycle"])["precondition"]
    assert "billing_account" in precondition["condition"]
    assert "billingbudgets.googleapis.com" in local("services")


def test_source_archive_holds_the_function_and_is_named_by_content():
    files = local("source_files")
    for part in ("main.py", "requirements.txt", '"builder/**"', '"nix/**"'):
        assert part in files
    obj = resource("google_storage_bucket_object", "source")
    assert re.search(r"data\.archive_file\.source\.output_(sha256|md5)", obj["name"])
    storage_source = one(one(one(function()["build_config"])["source"])["storage_source"])
    assert storage_source["object"] == "${google_storage_bucket_object.source.name}"


def test_archived_files_are_text():
    # The archive is built with file(), which reads UTF-8 text only.
    paths = [ROOT / "main.py", ROOT / "requirements.txt"]
    for folder in ("builder", "nix"):
        paths += [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    for path in paths:
        path.read_bytes().decode("utf-8")  # raises on a binary file


# --- function ------------------------------------------------------------------------


def test_entry_point_exists_in_main():
    build = one(function()["build_config"])
    assert build["entry_point"] == "registry"
    main = ROOT / "main.py"
    assert main.exists(), "main.py is missing"
    tree = ast.parse(main.read_text())
    assert "registry" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_python_runtime():
    default = variables()["python_runtime"]["default"]
    assert default in ("python311", "python312")
    assert one(function()["build_config"])["runtime"] == "${var.python_runtime}"


def test_scales_to_zero_and_sizes_are_variables():
    service = one(function()["service_config"])
    assert service["min_instance_count"] == 0
    for key, var in {
        "available_memory": "memory",
        "available_cpu": "cpu",
        "timeout_seconds": "timeout_seconds",
        "max_instance_request_concurrency": "concurrency",
        "max_instance_count": "max_instances",
    }.items():
        assert service[key] == "${var.%s}" % var
    assert service["service_account_email"] == "${google_service_account.runtime.email}"


def test_public_invocation_is_a_variable_public_by_default():
    invoker = resource("google_cloud_run_v2_service_iam_member", "public")
    assert invoker["count"] == "${var.public ? 1 : 0}"
    assert invoker["role"] == "roles/run.invoker" and invoker["member"] == "allUsers"
    assert variables()["public"]["default"] is True


# --- identity ------------------------------------------------------------------------


def test_runtime_identity_has_exactly_the_least_privilege_roles():
    granted = set()
    for kind, name, body in all_resources():
        if body.get("member") == RUNTIME_MEMBER or RUNTIME_MEMBER in body.get("members", []):
            target = body.get("bucket") or body.get("service_account_id") or body.get("project")
            granted.add((kind, body["role"], target))
    assert granted == {
        ("google_storage_bucket_iam_member", "roles/storage.objectAdmin", "${google_storage_bucket.layers.name}"),
        # Conditioned on the registry's database (test_the_runtime_reaches_only_its_own_firestore_database).
        ("google_project_iam_member", "roles/datastore.user", "${var.project}"),
        (
            "google_service_account_iam_member",
            "roles/iam.serviceAccountTokenCreator",
            "${google_service_account.runtime.name}",
        ),
    }
    assert environment()["GCS_SIGNING_ACCOUNT"] == "${google_service_account.runtime.email}"


BUILD_MEMBER = "${google_service_account.build.member}"


def test_the_build_identity_reaches_only_the_function_sources_bucket_and_its_image_repository():
    granted = {}
    for kind, name, body in all_resources():
        if body.get("member") == BUILD_MEMBER:
            granted[name] = (kind, body["role"], body.get("condition"))
    roles = {role for _, role, _ in granted.values()}
    assert roles == {"roles/logging.logWriter", "roles/storage.objectAdmin", "roles/storage.objectViewer",
                     "roles/artifactregistry.writer"}
    # Object admin (the role Google documents for a build account) only on the bucket Cloud
    # Functions stages sources in: the layers every client pulls are out of its reach.
    kind, role, condition = granted["build_reads_sources"]
    assert (kind, role) == ("google_project_iam_member", "roles/storage.objectAdmin")
    assert [name for name, (_, r, _) in granted.items() if r == "roles/storage.objectAdmin"] == ["build_reads_sources"]
    expression = one(condition)["expression"]
    assert "${local.function_sources_bucket}" in expression and "startsWith" in expression
    assert local("function_sources_bucket") == (
        "projects/_/buckets/gcf-v2-sources-${google_storage_bucket.source.project_number}-${var.region}")
    assert granted["build_reads_own_source"][0] == "google_storage_bucket_iam_member"
    assert resource("google_storage_bucket_iam_member", "build_reads_own_source")["bucket"] == (
        "${google_storage_bucket.source.name}")
    project_grants = [(role, c) for kind, role, c in granted.values() if kind == "google_project_iam_member"]
    assert all(c or role == "roles/logging.logWriter" for role, c in project_grants), project_grants


def test_no_authoritative_iam():
    # *_iam_binding and *_iam_policy replace whatever else the project grants.
    kinds = {kind for kind, _, _ in all_resources()}
    assert not {k for k in kinds if k.endswith("_iam_binding") or k.endswith("_iam_policy")}


# --- module hygiene ------------------------------------------------------------------


def test_required_apis_are_enabled():
    services = local("services")
    for api in ("cloudfunctions", "run", "cloudbuild", "artifactregistry", "storage", "firestore", "iamcredentials",
                "iam", "logging", "cloudresourcemanager"):
        assert f"{api}.googleapis.com" in services


def data_source(kind: str, name: str) -> dict[str, Any]:
    for block in terraform().get("data", []):
        if name in block.get(kind, {}):
            return block[kind][name]
    raise AssertionError(f"terraform has no data.{kind}.{name}")


def test_the_service_agents_are_created_once_their_apis_are_enabled():
    agents = data_source("http", "service_agent")
    assert agents["for_each"] == "${local.service_agent_apis}"
    agent_apis = set(re.findall(r"[a-z]+\.googleapis\.com", local("service_agent_apis")))
    assert agent_apis == {"cloudfunctions.googleapis.com", "run.googleapis.com", "cloudbuild.googleapis.com",
                          "artifactregistry.googleapis.com"}
    assert all(api in local("services") for api in agent_apis)  # enabled by the module itself
    assert agents["method"] == "POST"
    assert agents["url"] == ("https://serviceusage.googleapis.com/v1beta1/projects/${var.project}/services/"
                             "${each.key}:generateServiceIdentity")
    assert agents["request_headers"]["Authorization"] == "Bearer ${data.google_client_config.current.access_token}"
    assert agents["depends_on"] == ["${google_project_service.apis}"]
    # A failed call stops the apply with the API's answer, instead of a function build failing later.
    [check] = agents["lifecycle"][0]["postcondition"]
    assert check["condition"] == "${self.status_code == 200}"
    assert "${self.response_body}" in check["error_message"]


def test_the_function_waits_for_the_service_agents_its_apis_create():
    wait = resource("time_sleep", "service_agents")
    assert int(wait["create_duration"].rstrip("s")) >= 60
    assert "google_project_service.apis" in wait["triggers"]["apis"]
    assert wait["depends_on"] == ["${data.http.service_agent}"]
    assert "${time_sleep.service_agents}" in function()["depends_on"]
    assert "${time_sleep.service_agents}" in resource("google_artifact_registry_repository", "builds")["depends_on"]


@pytest.mark.parametrize("name, says", [
    ("project", "project ID"), ("region", "region"), ("name", "lower-case"), ("memory", "Gi"),
    ("cpu", "cpu"), ("concurrency", "1000"), ("max_instances", "at least 1"),
    ("layer_bucket_name", "56"), ("firestore_database", "(default)"), ("nix_bootstrap_store_path", "store path"),
    ("nix_bootstrap_sha256", "hex"),
])
def test_inputs_that_could_make_an_invalid_name_or_size_are_validated_with_a_message_saying_what_to_change(name, says):
    validation = one(variables()[name]["validation"])
    assert says in validation["error_message"]
    assert "var." + name in validation["condition"]


def test_bucket_names_stay_within_gcs_limits_and_memory_fits_the_cpu():
    layers = resource("google_storage_bucket", "layers")
    [precondition] = one(layers["lifecycle"])["precondition"]
    assert precondition["condition"] == "${length(local.layer_bucket_name) <= 56}"
    assert "Shorten var.name or set layer_bucket_name" in precondition["error_message"]
    assert resource("google_storage_bucket", "source")["name"] == "${local.layer_bucket_name}-source"  # +7 = 63
    # The longest project ID (30) and name (24) make too long a name: the precondition catches it.
    assert len("a" * 30 + "-" + "b" * 24 + "-layers") > 56
    preconditions = one(function()["lifecycle"])["precondition"]
    sizing = [p for p in preconditions if "local.memory_mib" in p["condition"]]
    assert sizing and "4Gi per vCPU" in sizing[0]["error_message"]


def test_providers_are_pinned():
    providers = one(one(terraform()["terraform"])["required_providers"])
    assert set(providers) == {"google", "archive", "http", "time"}
    for name in providers:
        assert re.fullmatch(r"\d+\.\d+\.\d+", providers[name]["version"]), providers[name]


def test_variables_are_described_and_only_project_and_region_are_required():
    required = set()
    for name, body in variables().items():
        assert body.get("description"), f"variable {name} has no description"
        if "default" not in body:
            required.add(name)
    assert required == {"project", "region"}


def test_outputs_give_a_host_at_the_root_and_a_pull_command():
    host = local("registry_host")
    assert "service_config[0].uri" in host and '"https://"' in host
    assert output("registry_host")["value"] == "${local.registry_host}"
    assert output("pull_command")["value"] == "docker pull ${local.registry_host}/shell/hello"


def test_the_archive_stub_turns_archive_file_into_a_local_the_module_still_parses(tmp_path):
    # scripts/check-terraform validates such a copy: hashicorp/archive cannot be obtained offline.
    for path in TERRAFORM.glob("*.tf"):
        (tmp_path / path.name).write_text(path.read_text())
    done = subprocess.run([sys.executable, ROOT / "scripts" / "stub-archive-file.py", tmp_path],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.tf")))
    assert "archive_file_source = {" in text and "local.archive_file_source.output_path" in text
    assert not re.search(r'data "archive_file"|data\.archive_file\.|hashicorp/archive', text)
    for path in tmp_path.glob("*.tf"):
        with path.open() as f:
            hcl2.load(f)



def test_the_ttl_field_operations_run_one_after_another():
    # Firestore refuses overlapping field operations on one database: the TTL fields form one chain.
    fields = resources("google_firestore_field")
    after = {name: [d.removeprefix("${google_firestore_field.").removesuffix("}") for d in body.get("depends_on", [])
                    if d.startswith("${google_firestore_field.")]
             for name, body in fields.items()}
    assert sorted(len(deps) for deps in after.values()) == [0] + [1] * (len(fields) - 1)
    followers = [deps[0] for deps in after.values() if deps]
    assert len(set(followers)) == len(followers), "two field operations wait on the same one and overlap"
