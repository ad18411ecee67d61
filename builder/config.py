"""Configuration from the environment, and the one place that picks the backends.

Each setting is declared once, as a field of Config naming its variable, default and
parser; README's table, terraform's tests and `from_env` all read that list. Variable
names follow Nixery's where Nixery had one, so its users switch without surprises.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .archive import COMPRESSIONS
from .errors import ServerError
from .names import ARCHITECTURES
from .sources import NIXPKGS_ARCHIVE, NIXPKGS_CHANNELS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PACKAGES = REPO_ROOT / "nix" / "demo"


# Parsers turn a variable's text into a setting's value; None means "use the default",
# a ValueError names what was expected.
def _word(raw: str) -> str | None:
    return raw.strip() or None


def _int(raw: str) -> int | None:
    if not raw.strip():
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError("a whole number") from None


def _bool(raw: str) -> bool | None:
    raw = raw.strip().lower()
    if not raw:
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _words(raw: str) -> tuple[str, ...]:
    # Set but empty means "none", unlike the other parsers.
    return tuple(p for p in raw.replace(",", " ").split() if p)


def setting(variable: str, default: Any = None, parse: Callable[[str], Any] = _word) -> Any:
    """A Config field read from environment `variable` with `parse`; `default` when unset."""
    return field(default=default, metadata={"variable": variable, "parse": parse})


@dataclass(frozen=True)
class Config:
    """Every setting, declared once: field = setting(VARIABLE, default, parser).

    README's configuration table lists the same variables (tests/test_config.py checks).
    """

    # Package source: at most one of these; the demo set when none is given.
    channel: str | None = setting("NIXERY_CHANNEL")
    pkgs_repo: str | None = setting("NIXERY_PKGS_REPO")
    pkgs_path: str | None = setting("NIXERY_PKGS_PATH")
    # A channel's or branch's commit is shared this long before it is asked again.
    revision_ttl: int = setting("REVISION_TTL", 600, _int)
    nixpkgs_channels_url: str = setting("NIXPKGS_CHANNELS_URL", NIXPKGS_CHANNELS)  # serves <channel>/git-revision
    nixpkgs_archive_url: str = setting("NIXPKGS_ARCHIVE_URL", NIXPKGS_ARCHIVE)  # the tarball of commit {rev}

    # Images
    always_include: tuple[str, ...] = setting("ALWAYS_INCLUDE", ("cacert", "iana-etc"), _words)
    max_layers: int = setting("MAX_LAYERS", 100, _int)  # store-path layers; one more is the customisation layer
    layer_solo_bytes: int = setting("LAYER_SOLO_BYTES", 1 << 20, _int)  # smaller paths share their package's layer
    max_packages: int = setting("MAX_PACKAGES", 64, _int)
    max_name_length: int = setting("MAX_NAME_LENGTH", 1024, _int)
    compression: str = setting("LAYER_COMPRESSION", "gzip")  # gzip | zstd | none
    pack_workers: int = setting("PACK_WORKERS", 0, _int)  # layers packed at once; 0: one per CPU
    manifest_ttl: int = setting("MANIFEST_TTL", 6 * 3600, _int)  # for sources without a commit
    pinned_manifest_ttl: int = setting("PINNED_MANIFEST_TTL", 30 * 24 * 3600, _int)  # for commits
    failure_ttl: int = setting("FAILURE_TTL", 60, _int)
    # Cost guards. Layers leave storage this many days after they were written (terraform's bucket
    # lifecycle rule); their records lapse a day earlier, and the layer is packed again. 0: never.
    layer_expiry_days: int = setting("LAYER_EXPIRY_DAYS", 30, _int)
    # A 40-hex tag builds from that commit: "any", "none", or the commits allowed.
    commit_tags: tuple[str, ...] = setting("COMMIT_TAGS", ("any",), _words)
    builds_per_client_per_hour: int = setting("BUILDS_PER_CLIENT_PER_HOUR", 0, _int)  # per instance; 0 = unbounded
    # A build lease lives this long unless its holder renews it (every third of it) while the build runs.
    build_lease_seconds: int = setting("BUILD_LEASE_SECONDS", 30, _int)
    build_concurrency: int = setting("BUILD_CONCURRENCY", 0, _int)  # builds at once per instance; 0 = by memory
    build_memory_bytes: int = setting("BUILD_MEMORY_BYTES", 768 << 20, _int)  # one build's memory (evaluation, packing)
    # What an image index lists, in order; empty: no index, single manifests only.
    platforms: tuple[str, ...] = setting("PLATFORMS", ("linux/amd64", "linux/arm64"), _words)

    # Nix
    nix_timeout: int = setting("NIX_TIMEOUT", 600, _int)
    nix_bin_dir: str | None = setting("NIX_BIN_DIR")
    nix_store: str | None = setting("NIX_STORE_ROOT")  # a chroot store; None = /nix/store
    nix_substituters: str = setting("NIX_SUBSTITUTERS", "", str)
    nix_trusted_public_keys: str = setting("NIX_TRUSTED_PUBLIC_KEYS", "", str)
    nix_max_jobs: str = setting("NIX_MAX_JOBS", "auto")  # 0 = substitute only, never compile
    nix_gc_above_bytes: int = setting("NIX_GC_ABOVE_BYTES", 0, _int)  # 0 = never
    # Nix's extra-platforms: systems besides the host's whose builders run here.
    nix_extra_platforms: str = setting("NIX_EXTRA_PLATFORMS", "", lambda raw: " ".join(_words(raw)))
    work_dir: str = setting("WORK_DIR", "/tmp/nixery")
    nix_bootstrap_url: str | None = setting("NIX_BOOTSTRAP_URL")
    nix_bootstrap_sha256: str | None = setting("NIX_BOOTSTRAP_SHA256")
    # A static Nix fetched by store path from NIX_SUBSTITUTERS, signed by NIX_TRUSTED_PUBLIC_KEYS.
    nix_bootstrap_store_path: str | None = setting("NIX_BOOTSTRAP_STORE_PATH")

    # Storage
    storage_backend: str = setting("NIXERY_STORAGE_BACKEND", "filesystem")  # filesystem | gcs
    storage_path: str = setting("STORAGE_PATH", "var/storage")
    gcs_bucket: str | None = setting("GCS_BUCKET")
    gcs_signed_url_ttl: int = setting("GCS_SIGNED_URL_TTL", 600, _int)  # at most 900
    gcs_public: bool = setting("GCS_PUBLIC", False, _bool)
    gcs_signing_account: str | None = setting("GCS_SIGNING_ACCOUNT")
    storage_emulator_host: str | None = setting("STORAGE_EMULATOR_HOST")
    google_application_credentials: str | None = setting("GOOGLE_APPLICATION_CREDENTIALS")
    google_cloud_project: str | None = setting("GOOGLE_CLOUD_PROJECT")

    # Cache
    cache_backend: str = setting("NIXERY_CACHE_BACKEND", "sqlite")  # sqlite | firestore (default with gcs)
    cache_path: str = setting("CACHE_PATH", "var/cache.sqlite")
    firestore_project: str | None = setting("FIRESTORE_PROJECT")  # else GOOGLE_CLOUD_PROJECT
    firestore_database: str = setting("FIRESTORE_DATABASE", "(default)")
    firestore_prefix: str = setting("FIRESTORE_COLLECTION_PREFIX", "nixery-", str)
    memory_cache_entries: int = setting("MEMORY_CACHE_ENTRIES", 10000, _int)
    manifest_memory_bytes: int = setting("MANIFEST_MEMORY_BYTES", 32 << 20, _int)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Config":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for variable, f in SETTINGS.items():
            raw = env.get(variable)
            if raw is None:
                continue
            try:
                value = f.metadata["parse"](raw)
            except ValueError as e:
                raise ServerError(f"configuration: {variable} must be {e}, not {raw!r}") from None
            if value is not None:
                values[f.name] = value
        # Defaults that depend on other settings.
        sources = [name for name in ("channel", "pkgs_repo", "pkgs_path") if name in values]
        if len(sources) > 1:
            raise ServerError(
                "configuration: set only one of NIXERY_CHANNEL, NIXERY_PKGS_REPO, NIXERY_PKGS_PATH"
            )
        if not sources:
            values["pkgs_path"] = str(DEMO_PACKAGES)
        if values.get("storage_backend") == "gcs":
            values.setdefault("cache_backend", "firestore")
        values.setdefault("firestore_project", values.get("google_cloud_project"))
        config = cls(**values)
        config.validate()
        return config

    @property
    def build_wait_seconds(self) -> int:
        """How long a request waits for a build: the Nix timeout, packing and storing, a lease lapse."""
        return self.nix_timeout + 120 + 2 * self.build_lease_seconds

    @property
    def layer_record_ttl(self) -> int | None:
        """Seconds a layer record lives, a day less than its object; None: for ever."""
        return (self.layer_expiry_days - 1) * 86400 if self.layer_expiry_days else None

    @property
    def blob_refresh_seconds(self) -> int | None:
        """Age past which a reused blob is made new again: half its life, so it outlives any image
        recorded now (image records live at most as long; see `image_ttl`). None: blobs never expire."""
        return self.layer_expiry_days * 86400 // 2 if self.layer_expiry_days else None

    def image_ttl(self, pinned: bool) -> int:
        """Seconds an image record lives: never longer than the blobs it names are sure to stay."""
        ttl = self.pinned_manifest_ttl if pinned else self.manifest_ttl
        return min(ttl, self.blob_refresh_seconds) if self.blob_refresh_seconds else ttl

    def commit_tag_allowed(self, commit: str) -> bool:
        return "any" in self.commit_tags or commit in self.commit_tags

    def validate(self) -> None:
        words = set(self.commit_tags)
        if not words or (words & {"any", "none"} and len(words) > 1) or not all(
                w in ("any", "none") or re.fullmatch(r"[0-9a-f]{40}", w) for w in words):
            raise ServerError("configuration: COMMIT_TAGS must be any, none, or a list of 40-hex commits")
        if self.layer_expiry_days not in (0,) and self.layer_expiry_days < 2:
            raise ServerError("configuration: LAYER_EXPIRY_DAYS must be 0 (never) or at least 2 days")
        if "{rev}" not in self.nixpkgs_archive_url:
            raise ServerError("configuration: NIXPKGS_ARCHIVE_URL must hold {rev}, where the commit goes")
        if self.compression not in COMPRESSIONS:
            raise ServerError("configuration: LAYER_COMPRESSION must be gzip, zstd or none")
        if self.pack_workers < 0:
            raise ServerError("configuration: PACK_WORKERS must be 0 (one per CPU) or more")
        if self.layer_solo_bytes < 0:
            raise ServerError("configuration: LAYER_SOLO_BYTES must be 0 (every path its own layer) or more")
        if not 1 <= self.max_layers <= 120:
            raise ServerError("configuration: MAX_LAYERS must be between 1 and 120 (clients reject more than 125)")
        if self.build_lease_seconds < 3:
            raise ServerError("configuration: BUILD_LEASE_SECONDS must be at least 3 (it is renewed every third)")
        if self.build_concurrency < 0:
            raise ServerError("configuration: BUILD_CONCURRENCY must be 0 (by memory) or more")
        if self.nix_bootstrap_url and not self.nix_bootstrap_sha256:
            raise ServerError("configuration: NIX_BOOTSTRAP_URL needs NIX_BOOTSTRAP_SHA256")
        if self.nix_bootstrap_store_path and not self.nix_bootstrap_url and not (
            self.nix_substituters.split() and self.nix_trusted_public_keys.split()
        ):
            raise ServerError(
                "configuration: NIX_BOOTSTRAP_STORE_PATH needs NIX_SUBSTITUTERS and NIX_TRUSTED_PUBLIC_KEYS "
                "(the binary cache it comes from and the key that signs it)"
            )
        if self.storage_backend not in ("filesystem", "gcs"):
            raise ServerError("configuration: NIXERY_STORAGE_BACKEND must be filesystem or gcs")
        if self.storage_backend == "gcs" and not self.gcs_bucket:
            raise ServerError("configuration: NIXERY_STORAGE_BACKEND=gcs needs GCS_BUCKET")
        if not 1 <= self.gcs_signed_url_ttl <= 900:
            raise ServerError("configuration: GCS_SIGNED_URL_TTL must be between 1 and 900 seconds")
        if self.cache_backend not in ("sqlite", "firestore"):
            raise ServerError("configuration: NIXERY_CACHE_BACKEND must be sqlite or firestore")
        known = [f"linux/{architecture}" for architecture in ARCHITECTURES]
        if not set(self.platforms) <= set(known) or len(set(self.platforms)) != len(self.platforms):
            raise ServerError(f"configuration: PLATFORMS lists distinct platforms out of {', '.join(known)}")


# Variable name -> its Config field, for documentation and deployment checks.
SETTINGS = {f.metadata["variable"]: f for f in fields(Config)}


def open_storage(config: Config):
    """The storage backend the configuration names."""
    if config.storage_backend == "gcs":
        from .storage.gcs import GcsStorage

        return GcsStorage.from_config(config)
    from .storage.filesystem import FilesystemStorage

    return FilesystemStorage(config.storage_path)


def open_cache(config: Config):
    """The cache backend the configuration names, behind this instance's own memory of it.

    Image and layer records never change once written, so the memory layer serves warm
    manifests without a round trip (Firestore answers in milliseconds, memory in microseconds).
    """
    from .cache.memory import MemoryCache

    if config.cache_backend == "firestore":
        from .cache.firestore import FirestoreCache

        shared = FirestoreCache.from_config(config)
    else:
        from .cache.sqlite import SqliteCache

        shared = SqliteCache(config.cache_path)
    return MemoryCache(shared, max_entries=config.memory_cache_entries)
