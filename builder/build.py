"""From an image request to a stored, cached image: the build path in order.

resolve the source -> cache -> build lease -> Nix closure (names resolved before under the
same revision from recorded facts, builder/resolution.py) -> layers -> pack and store new layers
-> config and manifests -> cache record. One build per image: threads share one in-flight build,
instances share a lease. A failing cache is served by building (logged as degraded), never a 5xx.
"""
from __future__ import annotations

import functools
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from . import (admission, archive, bootstrap, contents, coordination, errors, layers, logs, manifest, names, nix,
               referrers, resolution, sbom, sources)
from .cache import BuildProgress, BuiltImage, BuiltLayer, Cache, FailedBuild, ImageRecord, LayerRecord, ManifestRef
from .config import Config
from .storage import Storage

# How long a channel's or branch's last known commit may stand in when it cannot be asked.
REVISION_STALE_SECONDS = 7 * 24 * 3600
# How long the front page lists a failed build (retries are governed by FAILURE_TTL).
FAILURE_LISTED_SECONDS = 24 * 3600
# A build reports a new phase at once, and progress within a phase (layer N of M) at most this often.
PROGRESS_SECONDS = 1.0


class Progress:
    """Where one build is, written into its lease for the front page; only the lease's holder writes.

    Called with a phase: waiting for a build slot, evaluating, realising, packing N of M layers, uploading.
    A build without a lease (the cache is down) reports nothing.
    """

    def __init__(self, cache_call: Callable, cache: Cache, request: names.ImageRequest, tag: str, key: str,
                 holder: str | None):
        self._cache_call, self._cache, self._holder = cache_call, cache, holder
        self._request, self._tag, self._key = request, tag, key
        self.started = time.time()
        self._kind: str | None = None
        self._reported = 0.0
        self._lock = threading.Lock()  # layers are packed on several threads

    def __call__(self, phase: str) -> None:
        kind, now = phase.split()[0], time.monotonic()
        with self._lock:
            if self._holder is None or (kind == self._kind and now - self._reported < PROGRESS_SECONDS):
                return
            self._kind, self._reported = kind, now
        progress = BuildProgress(key=self._key, name=self._request.name, tag=self._tag,
                                 architecture=self._request.architecture, started=self.started, phase=phase)
        self._cache_call("progress", self._cache.report_build, self._key, self._holder, progress)


def nix_settings(config: Config, bin_dir: str | None, running: nix.RunningProcesses | None = None) -> nix.NixSettings:
    return nix.NixSettings(
        bin_dir=bin_dir,
        timeout=config.nix_timeout,
        store=config.nix_store,
        substituters=config.nix_substituters,
        trusted_public_keys=config.nix_trusted_public_keys,
        max_jobs=config.nix_max_jobs,
        extra_platforms=config.nix_extra_platforms,
        store_lock=os.path.join(config.work_dir, "store.lock"),
        running=running,
    )


def _cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_biggest_first(jobs: list[tuple[int, Callable[[], Any]]], workers: int) -> list[Any]:
    """Run (size, job) pairs on up to `workers` threads, biggest first; results in the jobs' order.

    After a failure no further job starts, and the first failure is raised once the running ones end.
    """
    workers = min(len(jobs), workers)
    if workers <= 1:
        return [job() for _, job in jobs]
    pool = ThreadPoolExecutor(workers, thread_name_prefix="pack")
    try:
        futures = {i: pool.submit(jobs[i][1]) for i in sorted(range(len(jobs)), key=lambda i: -jobs[i][0])}
        return [futures[i].result() for i in range(len(jobs))]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _registry_error(error: nix.NixError) -> errors.RegistryError:
    """What a client sees of a failed Nix run: the package's fault is a 4xx with Nix's own words."""
    if isinstance(error, nix.UnknownPackages):
        unknown = ", ".join(error.names)
        return errors.ManifestUnknown(f"unknown packages: {unknown}", {"unknown": list(error.names)})
    if isinstance(error, nix.PackageFailed):
        return errors.ManifestUnknown(error.message, {"nix": error.message})
    if isinstance(error, nix.NixTimeout):
        return errors.ManifestUnknown(error.message, {"nix": error.message})
    return errors.ServerError(f"Nix is not usable on this server: {error.message}")


class ImageBuilder:
    def __init__(self, config: Config, storage: Storage, cache: Cache, log: Callable[..., None] = logs.event):
        self.config = config
        self.storage = storage
        self.cache = cache
        self.log = log
        self._nix_settings: nix.NixSettings | None = None
        self._nix_settings_lock = threading.Lock()
        self.store_root = config.nix_store or "/"
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._in_flight: coordination.SingleFlight[ImageRecord] = coordination.SingleFlight()
        # Package sets this instance fetched, and one lock per source so only one fetch runs.
        self._fetched: set[str] = set()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._fetch_locks_lock = threading.Lock()
        self.admission = admission.BuildAdmission(config.builds_per_client_per_hour)
        # Set when the instance is told to stop: builds end, waits end, leases go back.
        self.stopping = threading.Event()
        self.running = nix.RunningProcesses()
        self.leases = coordination.LeaseKeeper(
            config.build_lease_seconds,
            lambda key, holder, until: self._cache_call("lease renewal", self.cache.renew_build, key, holder, until),
            lambda key, holder: self.log("build-lease-lost", f"lost the build lease of {key}", severity="WARNING",
                                         key=key, holder=holder),
        )
        slots = config.build_concurrency or coordination.build_slots_for(
            coordination.instance_memory_bytes(), config.build_memory_bytes, len(os.sched_getaffinity(0)))
        self.slots = coordination.BuildSlots(os.path.join(config.work_dir, "build-slots"), slots)

    # -- the cache, tolerated when it fails --------------------------------

    def _cache_call(self, what: str, call: Callable, *args, default=None):
        try:
            return call(*args)
        except Exception as e:  # any backend fault degrades to "no cache"
            self.log("cache-degraded", f"cache {what} failed: {e}", severity="WARNING", error=type(e).__name__)
            return default

    def cached_image(self, key: str) -> ImageRecord | None:
        return self._cache_call("read", self.cache.get_image, key, time.time())

    # -- entry point ---------------------------------------------------------

    def resolve_source(self, tag: str) -> sources.PackageSource:
        """The package source `tag` names, moving references resolved through the shared cache."""
        if sources.COMMIT.match(tag) and not self.config.commit_tag_allowed(tag):
            # Each commit is a package set of its own to download and evaluate: a cost guard.
            raise errors.Denied(
                f"tag {tag} names a commit, and this registry does not build from that commit "
                "(COMMIT_TAGS); pull 'latest' or a tag the registry serves")
        return sources.resolve(
            tag, channel=self.config.channel, pkgs_repo=self.config.pkgs_repo, pkgs_path=self.config.pkgs_path,
            remember=self._remember_revision, channels_url=self.config.nixpkgs_channels_url,
            archive_url=self.config.nixpkgs_archive_url,
        )

    def _remember_revision(self, key: str, lookup: Callable[[], dict]) -> dict:
        """One instance asks where a channel or branch is; the others take its answer for REVISION_TTL.

        The last answer is also kept for REVISION_STALE_SECONDS and served, with a warning, while
        the channel or repository cannot be reached, so images built from it stay pullable.
        """
        now, stale_key = time.time(), f"last:{key}"
        found = self._cache_call("revision read", self.cache.get_facts, "revision", [key, stale_key], now,
                                 default={})
        if key in found:
            return found[key].value
        try:
            value = lookup()
        except errors.ServerError as e:
            if stale_key not in found:
                raise
            self.log("revision-stale", f"cannot resolve {key} now; using the commit found before: {e.message}",
                     severity="WARNING", key=key, error=e.message)
            return found[stale_key].value
        self._cache_call("revision write", self.cache.put_facts, "revision", {key: value}, now + self.config.revision_ttl)
        self._cache_call("revision write", self.cache.put_facts, "revision", {stale_key: value},
                         now + REVISION_STALE_SECONDS)
        return value

    def image(self, request: names.ImageRequest, tag: str) -> ImageRecord:
        source = self.resolve_source(tag)
        key = names.image_key(request, source.identity)
        record = self.cached_image(key)
        if record is not None:
            return record
        # A build that starts here is counted against the requesting client (429 when over its share).
        return self._in_flight.run(key, lambda: self._coordinated_build(request, tag, source, key),
                                   on_lead=lambda: self.admission.admit(admission.CLIENT.get()))

    def _coordinated_build(self, request: names.ImageRequest, tag: str, source: sources.PackageSource,
                           key: str) -> ImageRecord:
        """Build under the cache's lease, or wait for whoever holds it.

        A live lease is renewed by its holder's heartbeat, so waiting on it is waiting
        on a build that runs; a holder that died stops renewing, and its lease lapses
        within BUILD_LEASE_SECONDS, when the next claim here takes the build over.
        """
        lease_seconds = self.config.build_lease_seconds
        wait, give_up = 0.1, time.time() + self.config.build_wait_seconds
        # One holder name per attempt: a lease names a build, not a process.
        holder = f"{self.holder}-{uuid.uuid4().hex[:8]}"
        while True:
            self._raise_if_stopping()
            now = time.time()
            lease = self._cache_call("lease", self.cache.claim_build, key, holder, now + lease_seconds, now)
            if lease is None:  # no coordination possible: build alone
                return self._build_and_record(request, tag, source, key, holder=None)
            if lease.holder == holder:
                # The previous holder may have finished between our cache read and this claim.
                record = self.cached_image(key)
                if record is not None:
                    self._cache_call("lease release", self.cache.finish_build, key, holder, None, 0)
                    return record
                return self._build_and_record(request, tag, source, key, holder=holder)
            if lease.error is not None:
                raise errors.RegistryError.from_remembered(lease.error)
            if now > give_up:
                raise errors.Unavailable("another instance is still building this image; try again shortly")
            self.stopping.wait(wait)
            wait = min(wait * 1.5, 1.0)
            record = self.cached_image(key)
            if record is not None:
                return record

    def _build_and_record(self, request: names.ImageRequest, tag: str, source: sources.PackageSource, key: str,
                          holder: str | None) -> ImageRecord:
        error_to_remember = None
        if holder is not None:
            self.leases.hold(key, holder)
        progress = Progress(self._cache_call, self.cache, request, tag, key, holder)
        try:
            # Queued for a slot with the lease held (and renewed): other instances wait, not build.
            progress("waiting for a build slot")
            with self.slots.slot(self.stopping, time.time() + self.config.build_wait_seconds):
                return self._build(request, tag, source, key, progress)
        except errors.RegistryError as e:
            if e.status < 500 and not self.stopping.is_set():
                error_to_remember = e.remembered()
            if not self.stopping.is_set():
                self._record_failure(request, tag, key, e)
            raise
        finally:
            if holder is not None:
                self.leases.release(key, holder)
                self._cache_call("lease release", self.cache.finish_build, key, holder, error_to_remember,
                                 time.time() + self.config.failure_ttl)

    def _record_failure(self, request: names.ImageRequest, tag: str, key: str, error: errors.RegistryError) -> None:
        """For the front page, which shows the message as clients get it (cleaned by redact.py)."""
        now = time.time()
        failure = FailedBuild(key=key, name=request.name, tag=tag, architecture=request.architecture, code=error.code,
                              message=error.message, finished=now, expires_at=now + FAILURE_LISTED_SECONDS)
        self._cache_call("failure write", self.cache.record_failure, failure)

    # -- stopping --------------------------------------------------------------

    def shutdown(self, grace: float = 3.0) -> None:
        """The instance is stopping (SIGTERM): end Nix, give every lease back at once.

        Another instance then starts the build on its next claim instead of waiting for
        the lease to lapse; requests waiting here end with a 503 the client retries.
        """
        if self.stopping.is_set():
            return  # SIGTERM may come twice: to the process group, then from gunicorn's master
        self.stopping.set()
        released = self.leases.release_all()
        for key, holder in released:  # first: another instance may start while Nix ends here
            self._cache_call("lease release", self.cache.finish_build, key, holder, None, 0)
        ended = self.running.terminate_all(grace)
        self.log("shutdown", "instance stopping: builds ended, leases released", nix_processes=ended,
                 leases=len(released))

    def _raise_if_stopping(self) -> None:
        if self.stopping.is_set():
            raise errors.Unavailable("this instance is stopping; try again")

    # -- the build itself ----------------------------------------------------

    def nix_settings(self) -> nix.NixSettings:
        """Nix for this instance, bootstrapped at the first build that needs it (never for a cached image)."""
        with self._nix_settings_lock:
            if self._nix_settings is None:
                settings = nix_settings(self.config, bootstrap.ensure_nix(self.config, self.log), self.running)
                nix.init_store(settings)  # before any two builds can meet in a new store
                self._nix_settings = settings
            return self._nix_settings

    def _build(self, request: names.ImageRequest, tag: str, source: sources.PackageSource, key: str,
               progress: Callable[[str], None]) -> ImageRecord:
        started = time.monotonic()
        os.makedirs(self.config.work_dir, exist_ok=True)
        work_dir = tempfile.mkdtemp(prefix="build-", dir=self.config.work_dir)
        fields = {"image": request.name, "key": key, "source": source.identity}
        seconds: dict[str, float] = {}
        try:
            recorded, recorded_paths = self._recorded_packages(request, source)
            try:
                closure = self._closure(request, source, recorded, recorded_paths, work_dir, seconds, progress)
                try:
                    record, image_layers, packed, layer_paths = self._assemble(
                        request, source, key, closure, recorded, work_dir, seconds, progress)
                except (nix.NixError, OSError, ValueError) as e:
                    if not recorded:
                        raise
                    # A recorded fact was wrong (a path no binary cache has, a layer that cannot
                    # be realised): evaluate everything, as if nothing were recorded.
                    self.log("resolution-fallback", f"recorded resolution of {request.name} failed: {e}",
                             severity="WARNING", error=str(e), **fields)
                    recorded = {}
                    closure = self._closure(request, source, {}, {}, work_dir, seconds, progress)
                    record, image_layers, packed, layer_paths = self._assemble(
                        request, source, key, closure, recorded, work_dir, seconds, progress)
            except nix.NixError as e:
                self._raise_if_stopping()  # Nix was ended by the shutdown, not by the packages
                error = _registry_error(e)
                self.log("nix-build", f"build of {request.name} failed", severity="WARNING", result="failed",
                         duration=round(time.monotonic() - started, 3), error=error.message, **fields)
                raise error from None
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)  # drops the GC roots too
        nix_seconds = seconds.get("fetch", 0.0) + seconds.get("evaluate", 0.0) + seconds.get("substitute", 0.0)
        built = BuiltImage(
            key=key, name=request.name, tag=tag, architecture=request.architecture, source=source.identity,
            manifests=record.manifests, size=sum(layer.size for layer in image_layers), layer_count=len(image_layers),
            build_seconds=time.monotonic() - started, finished=record.created, expires_at=record.expires_at,
            layers=tuple(BuiltLayer(layer.digest, layer.size, paths) for layer, paths in zip(image_layers, layer_paths)),
        )
        self._cache_call("recent image write", self.cache.record_image, built)
        self.log("nix-build", f"built {request.name}", result="built", duration=round(time.monotonic() - started, 3),
                 nix_seconds=round(nix_seconds, 3), layers=len(image_layers), layers_packed=packed,
                 store_paths=len(closure.paths), evaluated=len(request.packages) - len(recorded),
                 recorded=len(recorded), seconds={k: round(v, 3) for k, v in seconds.items()}, **fields)
        if nix_seconds:  # the store grew only if Nix ran (measuring it walks the whole store)
            self._collect_garbage_when_full()
        return record

    # -- resolutions recorded by earlier builds (builder/resolution.py) -------

    def _recorded_packages(self, request: names.ImageRequest, source: sources.PackageSource
                           ) -> tuple[dict[str, dict], dict[str, nix.StorePath]]:
        """The package facts of the requested names known with their whole closure, and those paths."""
        keys = {name: resolution.package_key(source, request.system, name) for name in request.packages}
        if None in keys.values():
            return {}, {}
        now = time.time()
        found = self._cache_call("resolution read", self.cache.get_facts, resolution.PACKAGE,
                                 list(keys.values()), now, default={})
        facts = {name: found[k].value for name, k in keys.items()
                 if k in found and resolution.readable_package(found[k].value)}
        if not facts:
            return {}, {}
        wanted = sorted({path for fact in facts.values() for path in fact["closure"]})
        found_paths = self._cache_call("closure read", self.cache.get_facts, resolution.PATH, wanted, now, default={})
        paths: dict[str, nix.StorePath] = {}
        for path, fact in found_paths.items():
            try:
                paths[path] = resolution.store_path(path, fact.value)
            except (KeyError, TypeError, ValueError):
                continue
        facts = {name: fact for name, fact in facts.items() if all(p in paths for p in fact["closure"])}
        return facts, paths

    def _closure(self, request: names.ImageRequest, source: sources.PackageSource, recorded: dict[str, dict],
                 recorded_paths: dict[str, nix.StorePath], work_dir: str, seconds: dict[str, float],
                 progress: Callable[[str], None]) -> nix.Closure:
        """The image's closure: recorded names from their facts, the others evaluated and realised (only those)."""
        unknown = [name for name in request.packages if name not in recorded]
        evaluated = None
        if unknown:
            before = time.monotonic()
            self._fetch_once(source, request.system)
            seconds["fetch"] = seconds.get("fetch", 0.0) + time.monotonic() - before
            evaluated = nix.realise(unknown, source, request.system, self.nix_settings(), work_dir, on_phase=progress)
            for step, spent in evaluated.seconds.items():
                seconds[step] = seconds.get(step, 0.0) + spent
        resolved = {name: fact["resolved"] for name, fact in recorded.items()}
        paths = {path: recorded_paths[path] for fact in recorded.values() for path in fact["closure"]}
        if evaluated is not None:
            resolved.update(evaluated.resolved)
            paths.update(evaluated.paths)
            gc_root_dir = evaluated.gc_root_dir
        else:
            gc_root_dir = tempfile.mkdtemp(prefix="roots-", dir=work_dir)
        return nix.Closure(
            roots={name: r["path"] for name, r in resolved.items()},
            paths=paths,
            gc_root_dir=gc_root_dir,
            resolved=resolved,
            attrs={name: r["attr"] for name, r in resolved.items()},
            info={name: r.get("info") or {} for name, r in resolved.items()},
            source_time=max((r["sourceTime"] for r in resolved.values() if isinstance(r.get("sourceTime"), int)),
                            default=None),
        )

    def _fetch_once(self, source: sources.PackageSource, system: str) -> None:
        """A package set not fetched on this instance yet is fetched once, before any evaluation of it.

        Builds running at once (an index's platforms, or several images) would otherwise each
        download and unpack it (nixpkgs: ~20 s and ~185 MiB of /tmp each). A failure is left to
        the evaluation that follows, which reports it.
        """
        if source.kind == "path" or source.identity in self._fetched:
            return
        with self._fetch_locks_lock:
            lock = self._fetch_locks.setdefault(source.identity, threading.Lock())
        with lock:
            if source.identity not in self._fetched and nix.fetch_package_set(source, system, self.nix_settings()):
                self._fetched.add(source.identity)

    def _assemble(self, request: names.ImageRequest, source: sources.PackageSource, key: str,
                  closure: nix.Closure, recorded: dict[str, dict], work_dir: str, seconds: dict[str, float],
                  progress: Callable[[str], None]) -> tuple[ImageRecord, list[manifest.Layer], int, list[tuple]]:
        """Plan, realise what is missing, pack and store the layers, then the image; record what was evaluated.

        Returns the record, the layers, how many were packed now, and each layer's store paths.
        """
        plans = layers.plan_layers(closure.paths, list(closure.roots.values()), self.config.max_layers,
                                   solo_bytes=self.config.layer_solo_bytes)
        customisation_root = None
        if recorded:
            # Paths from records may not be here: realise those of layers not stored yet, by path.
            missing = {path for plan in plans if self._stored_layer(self._layer_key(plan.key)) is None
                       for path in plan.paths}
            trees = {fact["resolved"]["path"]: fact["tree"] for fact in recorded.values() if fact.get("tree")}
            untreed = sorted(set(closure.roots.values()) - set(trees))
            missing |= set(untreed)
            if missing:
                progress("realising")
                before = time.monotonic()
                nix.realise_paths(sorted(missing), self.nix_settings(), closure.gc_root_dir)
                seconds["substitute"] = seconds.get("substitute", 0.0) + time.monotonic() - before
            for path in untreed:  # realised just now: read from the store, however large
                trees[path] = resolution.tree_of(self._on_disk(path), max_bytes=None)
            customisation_root = resolution.make_skeleton(os.path.join(work_dir, "skeleton"), trees)
        before = time.monotonic()
        stored = self._store_layers(plans, request, closure, customisation_root, progress)
        progress("uploading")
        image_layers = [layer for layer, _ in stored]
        packed = sum(1 for _, was_packed in stored if was_packed)
        record = self._store_image(request, source, key, image_layers, closure, customisation_root)
        seconds["pack"] = time.monotonic() - before
        self._record_resolutions(request, source, closure, set(closure.roots) - set(recorded))
        # The customisation layer, last, holds no store path of its own.
        return record, image_layers, packed, [plan.paths for plan in plans] + [()]

    def _on_disk(self, path: str) -> str:
        return nix.store_path_on_disk(path, self.store_root)

    def _record_resolutions(self, request: names.ImageRequest, source: sources.PackageSource,
                            closure: nix.Closure, evaluated: set[str]) -> None:
        """Share what this build evaluated: per name its answer, closure and output tree; per path its facts."""
        if not evaluated or source.revision is None:
            return
        facts, path_facts = {}, {}
        for name in sorted(evaluated):
            root = closure.roots[name]
            members = resolution.closure_of(closure.paths, root)
            facts[resolution.package_key(source, request.system, name)] = resolution.package_fact(
                closure.resolved[name], members, resolution.tree_of(self._on_disk(root)))
            for path in members:
                path_facts[path] = resolution.path_fact(closure.paths[path])
        expires_at = time.time() + self.config.image_ttl(source.pinned)
        # Paths first: a package fact is only used when its whole closure is recorded.
        self._cache_call("closure write", self.cache.put_facts, resolution.PATH, path_facts, expires_at)
        self._cache_call("resolution write", self.cache.put_facts, resolution.PACKAGE, facts, expires_at)

    def _collect_garbage_when_full(self) -> None:
        """Keep the store under NIX_GC_ABOVE_BYTES: on the function it lives in /tmp, in memory.

        Runs after the image is stored and recorded, so a failure costs nothing but a log line.
        """
        limit = self.config.nix_gc_above_bytes
        if limit <= 0 or self._nix_settings is None:  # no Nix ran here: nothing to collect
            return
        settings = self.nix_settings()
        try:
            before = nix.store_bytes_used(settings)
            if before <= limit:
                return
            started = time.monotonic()
            if nix.collect_garbage(settings):
                self.log("nix-gc", "collected garbage in the Nix store", bytes_before=before,
                         bytes_after=nix.store_bytes_used(settings), duration=round(time.monotonic() - started, 3))
        except (OSError, nix.NixError) as e:
            self.log("nix-gc", f"garbage collection failed: {e}", severity="WARNING", error=str(e))

    def _layer_key(self, key: str) -> str:
        """A layer's cache key: its content key (see layers.py) and the byte format it is packed in."""
        return f"{key}:{archive.FORMATS[self.config.compression]}"

    def _store_layers(self, plans: list[layers.LayerPlan], request: names.ImageRequest, closure: nix.Closure,
                      customisation_root: str | None = None,
                      progress: Callable[[str], None] = lambda phase: None) -> list[tuple[manifest.Layer, bool]]:
        """Every layer of the image, stored: packed and uploaded concurrently, in plan order.

        Up to `pack_workers` layers at once (one per CPU by default; each packer
        holds archive.PACKER_BYTES per compression thread plus what the upload
        buffers), the biggest first so the longest job does not start last. A
        layer bigger than one compression block also spreads its compression over
        the CPUs. Neither changes a byte: the digests are the same at any parallelism.
        """
        jobs: list[tuple[int, Callable[[], tuple[manifest.Layer, bool]]]] = [
            (plan.size, functools.partial(self._store_layer, plan)) for plan in plans
        ]
        jobs.append((0, functools.partial(self._customisation_layer, request, closure, customisation_root)))
        total, done, lock = len(jobs), [0], threading.Lock()

        def reported(job: Callable[[], tuple[manifest.Layer, bool]]) -> tuple[manifest.Layer, bool]:
            result = job()
            with lock:
                done[0] += 1
                progress(f"packing {min(done[0] + 1, total)} of {total} layers")
            return result

        progress(f"packing 1 of {total} layers")
        return run_biggest_first([(size, functools.partial(reported, job)) for size, job in jobs],
                                 self.config.pack_workers or _cpus())

    def _store_layer(self, plan: layers.LayerPlan) -> tuple[manifest.Layer, bool]:
        compression = self.config.compression
        threads = min(_cpus(), 1 + plan.size // archive.COMPRESSION_BLOCK)
        return self._reuse_or_pack(self._layer_key(plan.key), lambda out: archive.pack_store_paths(
            plan.paths, out, compression, self.store_root, threads=threads))

    def _customisation_layer(self, request: names.ImageRequest, closure: nix.Closure,
                             store_root: str | None = None) -> tuple[manifest.Layer, bool]:
        """`store_root`: where the roots' trees are read (a skeleton of recorded trees), else the store."""
        roots = [closure.roots[name] for name in sorted(closure.roots)]
        users = "nonroot" if request.nonroot else "root"
        compression = self.config.compression
        layer_key = self._layer_key(layers.customisation_key(roots, users))
        entries = archive.customisation_entries(roots, store_root or self.store_root,
                                                contents.user_entries(request.nonroot))
        return self._reuse_or_pack(layer_key, lambda out: archive.pack_entries(entries, out, compression))

    def _reuse_or_pack(self, layer_key: str, pack: Callable) -> tuple[manifest.Layer, bool]:
        """A layer seen before is neither packed nor stored again, as long as its blob is still there.

        Returns the layer and whether it was packed now. A packed layer is recorded in
        storage's layer index first (the record that outlives any cache), then in the cache.
        """
        found = self._stored_layer(layer_key)
        if found is not None:
            return manifest.Layer(found.digest, found.size, diff_id=found.diff_id, format=self._layer_format()), False
        with self.storage.upload() as upload:
            packed = pack(upload)
            upload.commit(packed.digest, packed.md5, packed.size, "application/octet-stream")
        ttl = self.config.layer_record_ttl
        record = LayerRecord(layer_key, packed.digest, packed.diff_id, packed.size, packed.md5,
                             expires_at=time.time() + ttl if ttl else 0.0)
        self.storage.put_layer_index(names.key_hash(layer_key), record.to_json())
        self._cache_call("layer write", self.cache.put_layer, record)
        return manifest.Layer(packed.digest, packed.size, diff_id=packed.diff_id, format=self._layer_format()), True

    def _stored_layer(self, layer_key: str) -> LayerRecord | None:
        """What `layer_key` produced before, if it passes `reusable`: the cache first, then storage's index.

        A record found only in the index goes back into the cache, so the next build takes the fast path.
        """
        cached = self._cache_call("layer read", self.cache.get_layer, layer_key)
        if cached is not None and self.reusable(cached):
            return cached
        # Unlike the cache, a failing index means failing storage: the build could not store the layer either.
        data = self.storage.read_layer_index(names.key_hash(layer_key))
        indexed = LayerRecord.from_json(data) if data is not None else None
        if indexed is None or indexed.key != layer_key or indexed == cached or not self.reusable(indexed):
            return None
        self._cache_call("layer write", self.cache.put_layer, indexed)
        return indexed

    def reusable(self, layer: LayerRecord) -> bool:
        """The one check a recorded layer passes before an image names it again: its stored blob is
        whole (the recorded size and MD5; see `Storage.verify`). A layer failing it is packed again."""
        if self.storage.verify(layer.digest, layer.size, layer.md5):
            return True
        self.log("layer-repacked", f"layer {layer.digest} is missing or damaged in storage; packing it again",
                 severity="WARNING", digest=layer.digest, size=layer.size)
        return False

    # -- healing: records whose blobs storage lost ------------------------------

    def forget_image(self, key: str, reason: str) -> None:
        """The image's manifest or config is gone from storage: the next request for it rebuilds it."""
        self.log("image-invalidated", f"image record dropped: {reason}", severity="WARNING", key=key)
        self._cache_call("image drop", self.cache.drop_image, key)

    def forget_blob(self, digest: str) -> list[str]:
        """Blob `digest` is missing or damaged: every image naming it is rebuilt at its next request."""
        keys = self._cache_call("image drop", self.cache.drop_images_with_blob, digest, default=[])
        if keys:
            self.log("image-invalidated", f"{len(keys)} image records dropped: blob {digest} is missing or damaged",
                     severity="WARNING", digest=digest, keys=keys[:20])
        return keys

    def _layer_format(self) -> str:
        return archive.MEDIA_SUFFIX[self.config.compression]

    def _store_image(self, request: names.ImageRequest, source: sources.PackageSource, key: str,
                     image_layers: list[manifest.Layer], closure: nix.Closure,
                     store_root: str | None = None) -> ImageRecord:
        run = contents.run_settings(request, closure.roots, closure.info, store_root or self.store_root)
        labels = contents.provenance(request, source, closure.info, closure.source_time)
        config_bytes = manifest.image_config(image_layers, request.architecture, run.env, run.cmd, run.user,
                                             labels, labels["org.opencontainers.image.created"])
        config_blob = manifest.Blob(manifest.digest_of(config_bytes), len(config_bytes))
        self.storage.put_bytes(config_blob.digest, config_bytes, "application/vnd.oci.image.config.v1+json")
        refs = []
        for media_type in manifest.manifest_types(self._layer_format()):
            data = manifest.image_manifest(media_type, config_blob, image_layers, labels)
            digest = manifest.digest_of(data)
            self.storage.put_bytes(digest, data, media_type)
            refs.append(ManifestRef(digest, len(data), media_type))
        artifacts = self._store_sbom(request, closure, labels, config_blob, refs)
        now = time.time()
        ttl = self.config.image_ttl(source.pinned)
        # Its manifests too: an index names them, and a lost one must drop the image behind it.
        blobs = (config_blob.digest, *dict.fromkeys(layer.digest for layer in image_layers), *artifacts,
                 *(ref.digest for ref in refs))
        record = ImageRecord(key, tuple(refs), source.identity, now, now + ttl, blobs)
        # Written last: every blob it points at is stored by now.
        self._cache_call("image write", self.cache.put_image, record)
        return record

    # -- the SBOM, a referrer of every manifest of the image -------------------

    def _store_sbom(self, request: names.ImageRequest, closure: nix.Closure, labels: dict[str, str],
                    config_blob: manifest.Blob, refs: list[ManifestRef]) -> list[str]:
        """Store the image's SBOM and one artifact manifest per image manifest, and record them as referrers.

        Returns the digests stored, so that losing one rebuilds the image.
        """
        started = time.monotonic()
        document = sbom.generate(closure, request.title, labels, config_blob.digest)
        blob = manifest.Blob(manifest.digest_of(document), len(document))
        self.storage.put_bytes(blob.digest, document, sbom.MEDIA_TYPE)
        self.storage.put_bytes(referrers.EMPTY_DIGEST, referrers.EMPTY_CONFIG, referrers.EMPTY_MEDIA_TYPE)
        annotations = {"org.opencontainers.image.created": labels["org.opencontainers.image.created"]}
        facts, stored = {}, [blob.digest]
        for ref in refs:
            data = referrers.artifact_manifest(manifest.Blob(ref.digest, ref.size), ref.media_type, sbom.MEDIA_TYPE,
                                               blob, sbom.FILE_NAME, annotations)
            stored.append(manifest.digest_of(data))
            self.storage.put_bytes(stored[-1], data, manifest.OCI_MANIFEST)
            facts[ref.digest] = {"manifests": [referrers.descriptor(data, sbom.MEDIA_TYPE, annotations)]}
        # They lapse with the blobs when the bucket expires them (LAYER_EXPIRY_DAYS).
        ttl = self.config.layer_record_ttl or referrers.FACT_TTL
        self._cache_call("referrers write", self.cache.put_facts, referrers.FACT_KIND, facts, time.time() + ttl)
        self.log("sbom", f"SBOM of {request.name}", image=request.name, components=len(closure.paths),
                 bytes=len(document), duration=round(time.monotonic() - started, 4))
        return stored

    def referrers(self, digest: str) -> list[dict]:
        """Descriptors of the artifact manifests whose subject is manifest `digest` (none when unknown)."""
        facts = self._cache_call("referrers read", self.cache.get_facts, referrers.FACT_KIND, [digest], time.time(),
                                 default={})
        fact = facts.get(digest)
        manifests = fact.value.get("manifests") if fact is not None and isinstance(fact.value, dict) else None
        return [d for d in manifests if isinstance(d, dict)] if isinstance(manifests, list) else []
