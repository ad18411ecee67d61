"""Configuration from the environment, and the one place that picks the backends.

Variable names follow Nixery's where Nixery had one, so its users switch
without surprises. Everything the code reads from the environment is read
here (terraform's tests check that each is set or defaulted).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .errors import ServerError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PACKAGES = REPO_ROOT / "nix" / "demo"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ServerError(f"configuration: {name} must be a whole number, not {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ServerError(f"configuration: {name} must be true or false, not {raw!r}")


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if name not in env:
        return default
    return tuple(p for p in env[name].replace(",", " ").split() if p)


@dataclass(frozen=True)
class Config:
    # Package source: exactly one of these (Nixery's variables); the demo set when none is given.
    channel: str | None = None  # NIXERY_CHANNEL
    pkgs_repo: str | None = None  # NIXERY_PKGS_REPO
    pkgs_path: str | None = None  # NIXERY_PKGS_PATH

    # Images
    always_include: tuple[str, ...] = ("cacert", "iana-etc")  # ALWAYS_INCLUDE
    max_layers: int = 100  # MAX_LAYERS: store-path layers; one more is the customisation layer
    max_packages: int = 64  # MAX_PACKAGES
    max_name_length: int = 1024  # MAX_NAME_LENGTH
    compression: str = "gzip"  # LAYER_COMPRESSION: gzip | none
    manifest_ttl: int = 6 * 3600  # MANIFEST_TTL: for moving sources (channels, branches)
    pinned_manifest_ttl: int = 30 * 24 * 3600  # PINNED_MANIFEST_TTL: for commits
    failure_ttl: int = 60  # FAILURE_TTL: a failed build is remembered this long
    build_lease_seconds: int = 0  # BUILD_LEASE_SECONDS: a build lease's life; 0 = NIX_TIMEOUT + 120

    # Nix
    nix_timeout: int = 600  # NIX_TIMEOUT: seconds for one image's Nix work
    nix_bin_dir: str | None = None  # NIX_BIN_DIR
    nix_store: str | None = None  # NIX_STORE_ROOT: a chroot store; None = /nix/store
    nix_substituters: str = ""  # NIX_SUBSTITUTERS
    nix_trusted_public_keys: str = ""  # NIX_TRUSTED_PUBLIC_KEYS
    nix_max_jobs: str = "auto"  # NIX_MAX_JOBS: 0 = substitute only, never compile
    nix_gc_above_bytes: int = 0  # NIX_GC_ABOVE_BYTES: collect garbage after a build above this; 0 never
    work_dir: str = "/tmp/nixery"  # WORK_DIR: GC roots and scratch files
    nix_bootstrap_url: str | None = None  # NIX_BOOTSTRAP_URL: a pinned Nix artefact, fetched at the first build
    nix_bootstrap_sha256: str | None = None  # NIX_BOOTSTRAP_SHA256: its checksum, verified before it runs

    # Storage
    storage_backend: str = "filesystem"  # NIXERY_STORAGE_BACKEND: filesystem | gcs
    storage_path: str = "var/storage"  # STORAGE_PATH
    gcs_bucket: str | None = None  # GCS_BUCKET
    gcs_signed_url_ttl: int = 600  # GCS_SIGNED_URL_TTL: seconds, at most 900
    gcs_public: bool = False  # GCS_PUBLIC: plain URLs to a public bucket instead of signed ones
    gcs_signing_account: str | None = None  # GCS_SIGNING_ACCOUNT: service account for signBlob

    # Cache
    cache_backend: str = "sqlite"  # NIXERY_CACHE_BACKEND: sqlite | firestore
    cache_path: str = "var/cache.sqlite"  # CACHE_PATH
    firestore_project: str | None = None  # FIRESTORE_PROJECT (else GOOGLE_CLOUD_PROJECT)
    firestore_database: str = "(default)"  # FIRESTORE_DATABASE
    firestore_prefix: str = "nixery-"  # FIRESTORE_COLLECTION_PREFIX: collections <prefix>manifests, layers, builds
    memory_cache_entries: int = 10000  # MEMORY_CACHE_ENTRIES: records this instance keeps in memory
    manifest_memory_bytes: int = 32 << 20  # MANIFEST_MEMORY_BYTES: manifests this instance keeps in memory

    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Config":
        env = dict(os.environ if env is None else env)
        channel = env.get("NIXERY_CHANNEL") or None
        pkgs_repo = env.get("NIXERY_PKGS_REPO") or None
        pkgs_path = env.get("NIXERY_PKGS_PATH") or None
        if sum(x is not None for x in (channel, pkgs_repo, pkgs_path)) > 1:
            raise ServerError(
                "configuration: set only one of NIXERY_CHANNEL, NIXERY_PKGS_REPO, NIXERY_PKGS_PATH"
            )
        if not (channel or pkgs_repo or pkgs_path):
            pkgs_path = str(DEMO_PACKAGES)
        storage_backend = env.get("NIXERY_STORAGE_BACKEND", "filesystem").strip() or "filesystem"
        default_cache = "firestore" if storage_backend == "gcs" else "sqlite"
        config = cls(
            channel=channel,
            pkgs_repo=pkgs_repo,
            pkgs_path=pkgs_path,
            always_include=_list(env, "ALWAYS_INCLUDE", cls.always_include),
            max_layers=_int(env, "MAX_LAYERS", cls.max_layers),
            max_packages=_int(env, "MAX_PACKAGES", cls.max_packages),
            max_name_length=_int(env, "MAX_NAME_LENGTH", cls.max_name_length),
            compression=env.get("LAYER_COMPRESSION", cls.compression).strip() or cls.compression,
            manifest_ttl=_int(env, "MANIFEST_TTL", cls.manifest_ttl),
            pinned_manifest_ttl=_int(env, "PINNED_MANIFEST_TTL", cls.pinned_manifest_ttl),
            failure_ttl=_int(env, "FAILURE_TTL", cls.failure_ttl),
            build_lease_seconds=_int(env, "BUILD_LEASE_SECONDS", cls.build_lease_seconds),
            nix_timeout=_int(env, "NIX_TIMEOUT", cls.nix_timeout),
            nix_bin_dir=env.get("NIX_BIN_DIR") or None,
            nix_store=env.get("NIX_STORE_ROOT") or None,
            nix_substituters=env.get("NIX_SUBSTITUTERS", ""),
            nix_trusted_public_keys=env.get("NIX_TRUSTED_PUBLIC_KEYS", ""),
            nix_max_jobs=env.get("NIX_MAX_JOBS", cls.nix_max_jobs).strip() or cls.nix_max_jobs,
            nix_gc_above_bytes=_int(env, "NIX_GC_ABOVE_BYTES", cls.nix_gc_above_bytes),
            work_dir=env.get("WORK_DIR", cls.work_dir),
            nix_bootstrap_url=env.get("NIX_BOOTSTRAP_URL") or None,
            nix_bootstrap_sha256=env.get("NIX_BOOTSTRAP_SHA256") or None,
            storage_backend=storage_backend,
            storage_path=env.get("STORAGE_PATH", cls.storage_path),
            gcs_bucket=env.get("GCS_BUCKET") or None,
            gcs_signed_url_ttl=_int(env, "GCS_SIGNED_URL_TTL", cls.gcs_signed_url_ttl),
            gcs_public=_bool(env, "GCS_PUBLIC", cls.gcs_public),
            gcs_signing_account=env.get("GCS_SIGNING_ACCOUNT") or None,
            cache_backend=env.get("NIXERY_CACHE_BACKEND", default_cache).strip() or default_cache,
            cache_path=env.get("CACHE_PATH", cls.cache_path),
            firestore_project=env.get("FIRESTORE_PROJECT") or env.get("GOOGLE_CLOUD_PROJECT") or None,
            firestore_database=env.get("FIRESTORE_DATABASE", cls.firestore_database),
            firestore_prefix=env.get("FIRESTORE_COLLECTION_PREFIX", cls.firestore_prefix),
            memory_cache_entries=_int(env, "MEMORY_CACHE_ENTRIES", cls.memory_cache_entries),
            manifest_memory_bytes=_int(env, "MANIFEST_MEMORY_BYTES", cls.manifest_memory_bytes),
            env=env,
        )
        config.validate()
        return config

    @property
    def lease_seconds(self) -> int:
        # Long enough for the Nix timeout plus packing and uploading what it built.
        return self.build_lease_seconds or self.nix_timeout + 120

    def validate(self) -> None:
        if self.compression not in ("gzip", "none"):
            raise ServerError("configuration: LAYER_COMPRESSION must be gzip or none")
        if not 1 <= self.max_layers <= 120:
            raise ServerError("configuration: MAX_LAYERS must be between 1 and 120 (clients reject more than 125)")
        if self.nix_bootstrap_url and not self.nix_bootstrap_sha256:
            raise ServerError("configuration: NIX_BOOTSTRAP_URL needs NIX_BOOTSTRAP_SHA256")
        if self.storage_backend not in ("filesystem", "gcs"):
            raise ServerError("configuration: NIXERY_STORAGE_BACKEND must be filesystem or gcs")
        if self.storage_backend == "gcs" and not self.gcs_bucket:
            raise ServerError("configuration: NIXERY_STORAGE_BACKEND=gcs needs GCS_BUCKET")
        if not 1 <= self.gcs_signed_url_ttl <= 900:
            raise ServerError("configuration: GCS_SIGNED_URL_TTL must be between 1 and 900 seconds")
        if self.cache_backend not in ("sqlite", "firestore"):
            raise ServerError("configuration: NIXERY_CACHE_BACKEND must be sqlite or firestore")


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
