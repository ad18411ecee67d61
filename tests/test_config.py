"""Configuration: the declared settings, their parsing, and README's table of them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from builder.config import DEMO_PACKAGES, SETTINGS, Config
from builder.errors import ServerError

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast

ROOT = Path(__file__).resolve().parent.parent
# In README's table but read by the server around the function, not by builder/.
SERVER_VARIABLES = {"WORKERS", "THREADS", "PORT", "HOST"}


def readme_rows() -> dict[str, str]:
    """README's configuration table: variable -> its default cell."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n\n")[2]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        variables, default, _meaning = line.strip("|").split("|", 2)
        for variable in re.findall(r"`(\w+)`", variables):
            rows[variable] = default.strip()
    return rows


def shown(default) -> str:
    """A default as README writes it."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return " ".join(default)
    return str(default)


def test_readme_documents_exactly_the_declared_settings():
    rows = readme_rows()
    assert len(rows) > 30  # the table was found
    assert sorted(set(SETTINGS) - set(rows)) == [], "declared in builder/config.py, missing from README"
    assert sorted(set(rows) - set(SETTINGS) - SERVER_VARIABLES) == [], "in README, not declared"


def test_readme_states_each_plain_default():
    rows = readme_rows()
    for variable, f in SETTINGS.items():
        if f.default in (None, ""):
            continue  # unset, or worked out from other settings: README says how in words
        cell = re.match(r"`([^`]*)`", rows[variable])
        assert cell and cell.group(1) == shown(f.default), f"{variable}: README says {rows[variable]!r}"


def test_unset_variables_give_the_declared_defaults():
    config = Config.from_env({})
    for f in SETTINGS.values():
        if f.name not in ("pkgs_path",):
            assert getattr(config, f.name) == f.default, f.name
    assert config.pkgs_path == str(DEMO_PACKAGES)  # no package source: the demo set


def test_each_parser_reads_its_variable():
    config = Config.from_env({
        "MAX_LAYERS": " 20 ", "GCS_PUBLIC": "yes", "ALWAYS_INCLUDE": "cacert, git  htop",
        "LAYER_COMPRESSION": " none ", "FIRESTORE_COLLECTION_PREFIX": "", "NIX_BIN_DIR": "",
        "NIXERY_CHANNEL": "nixos-24.05",
    })
    assert config.max_layers == 20 and config.gcs_public is True
    assert config.always_include == ("cacert", "git", "htop")
    assert config.compression == "none"
    assert config.firestore_prefix == ""  # taken as given
    assert config.nix_bin_dir is None  # empty is unset
    assert config.channel == "nixos-24.05" and config.pkgs_path is None
    assert Config.from_env({"ALWAYS_INCLUDE": ""}).always_include == ()  # set but empty: nothing added
    assert Config.from_env({"MAX_LAYERS": ""}).max_layers == Config.max_layers


@pytest.mark.parametrize("env, message", [
    ({"MAX_LAYERS": "ten"}, "MAX_LAYERS must be a whole number, not 'ten'"),
    ({"GCS_PUBLIC": "maybe"}, "GCS_PUBLIC must be true or false, not 'maybe'"),
    ({"NIXERY_CHANNEL": "a", "NIXERY_PKGS_PATH": "b"}, "set only one of"),
    ({"MAX_LAYERS": "121"}, "MAX_LAYERS must be between 1 and 120"),
])
def test_bad_values_are_refused_naming_the_variable(env, message):
    with pytest.raises(ServerError, match=re.escape(message)):
        Config.from_env(env)


def test_defaults_that_follow_other_settings():
    cloud = Config.from_env({"NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": "b", "GOOGLE_CLOUD_PROJECT": "p"})
    assert cloud.cache_backend == "firestore" and cloud.firestore_project == "p"
    chosen = Config.from_env({"NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": "b", "NIXERY_CACHE_BACKEND": "sqlite",
                              "GOOGLE_CLOUD_PROJECT": "p", "FIRESTORE_PROJECT": "f"})
    assert chosen.cache_backend == "sqlite" and chosen.firestore_project == "f"


def test_only_config_reads_settings_from_the_environment():
    # nix.py and sources.py copy the environment for the child processes they start.
    passes_it_on = {"nix.py", "sources.py"}
    readers = {str(p.relative_to(ROOT / "builder")) for p in (ROOT / "builder").rglob("*.py")
               if re.search(r"os\.environ|getenv", p.read_text())}
    assert readers <= {"config.py"} | passes_it_on


def test_image_records_never_outlive_the_blobs_they_name():
    config = Config.from_env({"LAYER_EXPIRY_DAYS": "30"})
    assert config.blob_refresh_seconds == 15 * 86400
    assert config.image_ttl(pinned=True) == 15 * 86400  # 30 days asked, capped by the blobs' life
    assert config.image_ttl(pinned=False) == config.manifest_ttl
    never = Config.from_env({"LAYER_EXPIRY_DAYS": "0"})
    assert never.blob_refresh_seconds is None and never.image_ttl(pinned=True) == never.pinned_manifest_ttl
