"""Running Nix: turn package names into a realised runtime closure.

Three commands: `nix-instantiate` resolves the names (unknown and broken ones come back as
data), `nix-store --realise` builds or substitutes them under GC roots, `nix path-info` gives
the closure with sizes and references. Every option is passed on the command line, so the host's
nix.conf never changes behaviour; `collect_garbage` empties a store that lives in memory.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from .sources import PackageSource

IMAGE_NIX = Path(__file__).resolve().parent.parent / "nix" / "image.nix"

# Bounds for messages shown to clients: enough to see why, not a whole log.
MESSAGE_MAX_LINES = 15
MESSAGE_MAX_CHARS = 1500

# How long Nix gets to stop its builders after SIGTERM before SIGKILL.
TERMINATE_GRACE = 10.0

# Extra seconds the Python deadline grants Nix's own build timeout.
REALISE_SLACK = 5.0

# Failed names evaluated one by one for their messages, at most.
MAX_FAILED_PROBES = 5


@dataclass(frozen=True)
class NixSettings:
    bin_dir: str | None = None  # where nix-build etc. live; None = PATH
    timeout: int = 600  # seconds for one image's Nix work (NIX_TIMEOUT)
    store: str | None = None  # a chroot store root (`--store DIR`), None = /nix/store
    substituters: str = ""  # offline default: none
    trusted_public_keys: str = ""
    max_jobs: int | str = "auto"  # 0 = substitute only, never compile
    # Systems besides the host's whose builders run here (Nix's extra-platforms); none by default:
    # foreign outputs normally come from the binary cache.
    extra_platforms: str = ""
    extra_options: tuple[tuple[str, str], ...] = ()
    # A file every process using this store locks: builds shared, garbage collection
    # exclusively. None: no garbage collection.
    store_lock: str | None = None
    # The instance's running Nix processes, so that a stopping instance can end them.
    running: "RunningProcesses | None" = None


@dataclass(frozen=True)
class StorePath:
    path: str  # logical /nix/store/... name
    nar_size: int
    references: tuple[str, ...]  # sorted, without the path itself
    nar_hash: str = ""  # as Nix prints it ("sha256:..."); empty when unknown


@dataclass
class Closure:
    roots: dict[str, str]  # requested name -> realised output store path
    paths: dict[str, StorePath]  # every path of the runtime closure
    gc_root_dir: str  # keeps the paths alive; caller deletes it when done
    # requested name -> the evaluation's whole answer for it (attr, drvPath, path, outputName, ...)
    resolved: dict[str, dict] = field(default_factory=dict)
    # Seconds spent: "evaluate" (fetching the package set included), "substitute" (building too).
    seconds: dict[str, float] = field(default_factory=dict)
    attrs: dict[str, str] = field(default_factory=dict)  # requested name -> attribute path it resolved to
    # requested name -> what the package set says of it: pname, version, mainProgram,
    # description, homepage (each str or None) and licenses ([{spdxId, name}]).
    info: dict[str, dict] = field(default_factory=dict)
    source_time: int | None = None  # unix seconds of the package set's commit, where known (git)


class NixError(Exception):
    """Base of Nix failures; `message` is fit to show to a client."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class UnknownPackages(NixError):
    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        super().__init__("unknown package" + ("s" if len(self.names) > 1 else "") + ": " + ", ".join(self.names))


class PackageFailed(NixError):
    """A package that fails to evaluate or to build: the package's fault, not ours."""

    def __init__(self, names: Sequence[str], message: str):
        self.names = list(names)
        self.name = self.names[0] if self.names else ""
        super().__init__(message)


class NixTimeout(NixError):
    pass


class NixUnavailable(NixError):
    """Nix is missing or broken, or the package set cannot be loaded: a server fault."""


# ---------------------------------------------------------------------------
# Command lines


def _binary(settings: NixSettings, name: str) -> str:
    return os.path.join(settings.bin_dir, name) if settings.bin_dir else name


def _options(settings: NixSettings, timeout: int | None = None) -> list[str]:
    options: list[tuple[str, str]] = [
        ("substituters", settings.substituters),
        ("trusted-public-keys", settings.trusted_public_keys),
        # No sandbox and no build users: a Cloud Function runs as one user
        # without namespaces; the nixbld group usually does not exist.
        ("sandbox", "false"),
        ("build-users-group", ""),
        # Concurrent builds of the same path wait on a store lock; Nix re-checks
        # it every 5 s by default.
        ("build-poll-interval", "1"),
        ("max-jobs", str(settings.max_jobs)),
        ("fallback", "true"),
        ("keep-build-log", "false"),
        ("log-lines", "10"),
        ("experimental-features", "nix-command"),
    ]
    if settings.store:
        options.append(("store", settings.store))
    if settings.extra_platforms:
        options.append(("extra-platforms", settings.extra_platforms))
    if timeout is not None:
        options += [("timeout", str(timeout)), ("max-silent-time", str(timeout))]
    options += list(settings.extra_options)
    args: list[str] = []
    for name, value in options:
        args += ["--option", name, value]
    return args


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # Settings come only from the command line.
    env.pop("NIX_CONFIG", None)
    env["NO_COLOR"] = "1"
    env.setdefault("NIX_PATH", "")
    # fetchGit/fetchTarball cache under ~/.cache; a Cloud Function's home is
    # read-only, so fall back to the temporary directory.
    home = env.get("HOME", "")
    if "XDG_CACHE_HOME" not in env and not (home and os.access(home, os.W_OK)):
        env["XDG_CACHE_HOME"] = os.path.join(tempfile.gettempdir(), "nix-cache")
    return env


@dataclass
class _Result:
    returncode: int
    stdout: str
    stderr: str


class _Deadline:
    def __init__(self, seconds: int):
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def whole_seconds(self) -> int:
        return max(1, int(self.remaining()))


class RunningProcesses:
    """The Nix processes (each leading its own process group) one instance has running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen] = set()

    def add(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.add(process)

    def discard(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    def terminate_all(self, grace: float) -> int:
        """SIGTERM every group (Nix then ends its builders), SIGKILL what outlives `grace`."""
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        for process in processes:
            if process.poll() is None:
                _signal_group(process, signal.SIGKILL)
        return len(processes)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _run(args: list[str], deadline: _Deadline, what: str, slack: float = 0.0,
         running: RunningProcesses | None = None) -> _Result:
    """Run one Nix command within the deadline.

    Nix runs in its own process group. On expiry the group gets SIGTERM, never
    SIGKILL first: Nix then kills its builders (which sit in sessions of their
    own); a killed Nix would leave them running.
    """
    remaining = deadline.remaining()
    if remaining <= 0:
        raise NixTimeout(f"Nix timed out before {what}")
    try:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(),
            start_new_session=True,
        )
    except OSError as e:
        raise NixUnavailable(f"cannot run {args[0]}: {e.strerror or e}") from None
    if running is not None:
        running.add(process)
    try:
        stdout, stderr = process.communicate(timeout=remaining + slack)
    except subprocess.TimeoutExpired:
        _terminate(process)
        raise NixTimeout(f"Nix timed out during {what}") from None
    except BaseException:
        _terminate(process)
        raise
    finally:
        if running is not None:
            running.discard(process)
    return _Result(process.returncode, stdout.decode("utf-8", "replace"), _clean(stderr.decode("utf-8", "replace")))


def _terminate(process: subprocess.Popen) -> None:
    _signal_group(process, signal.SIGTERM)
    try:
        process.communicate(timeout=TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.communicate()


# ---------------------------------------------------------------------------
# Messages

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_SOURCE_LINE = re.compile(r"^\s*(\d+)?\s*\|")
_NOISE = re.compile(
    r"^(For full logs, run|\(use '--show-trace'|warning: |these \d+ derivations will be built|"
    r"this derivation will be built|building '|/nix/store/\S+\.drv$)"
)


def _clean(text: str) -> str:
    # Nix 2.8 can leak NUL bytes into stderr when a builder fails to start.
    return _ANSI.sub("", text.replace("\x00", ""))


def error_message(stderr: str, fallback: str = "Nix failed") -> str:
    """The first useful lines of a Nix error, bounded, for a client to read."""
    lines = [line.rstrip() for line in _clean(stderr).splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    if start is None:
        kept = [line.strip() for line in lines if line.strip() and not _NOISE.match(line.strip())]
        kept = kept[-MESSAGE_MAX_LINES:]
    else:
        kept = []
        for line in lines[start:]:
            stripped = line.strip()
            if not stripped or _NOISE.match(stripped) or _SOURCE_LINE.match(line):
                continue
            if stripped.startswith("at ") and stripped.endswith(":"):
                continue  # source positions name files of the server
            kept.append(stripped)
    text = "\n".join(kept[:MESSAGE_MAX_LINES]).strip()
    if len(text) > MESSAGE_MAX_CHARS:
        text = text[: MESSAGE_MAX_CHARS - 3].rstrip() + "..."
    return text or fallback


# Failures of the machine rather than of a package.
_SERVER_FAULT = re.compile(
    r"No space left on device|Permission denied|Read-only file system|cannot connect to|"
    r"getting status of '/nix|opening lock file|unable to download|Could not resolve host|"
    r"SQLite database .* is busy|cannot open connection|database disk image is malformed",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------
# The three steps


def _evaluate(
    names: list[str], source: "PackageSource", system: str, settings: NixSettings, deadline: _Deadline, strict: bool
) -> _Result:
    args = [
        _binary(settings, "nix-instantiate"),
        "--eval",
        "--strict",
        "--json",
        "--read-write-mode",
        *_options(settings),
        str(IMAGE_NIX),
        "--argstr",
        "packagesJson",
        json.dumps(names),
        "--argstr",
        "sourceJson",
        json.dumps(source.to_nix()),
        "--argstr",
        "system",
        system,
    ]
    if strict:
        args += ["--arg", "strict", "true"]
    return _run(args, deadline, "evaluation", running=settings.running)


def _parse_evaluation(result: _Result) -> dict[str, Any]:
    try:
        answer = json.loads(result.stdout)
        answer["packages"], answer["unknown"], answer["failed"]
        return answer
    except (ValueError, KeyError, TypeError):
        raise NixUnavailable("Nix gave an unreadable answer: " + error_message(result.stderr, result.stdout[:200]))


def resolve(
    packages: list[str], source: "PackageSource", system: str, settings: NixSettings, deadline: _Deadline
) -> dict[str, dict[str, str]]:
    """Name -> {attr, drvPath, path, outputName, info}; raises for unknown or broken names."""
    result = _evaluate(packages, source, system, settings, deadline, strict=False)
    if result.returncode != 0:
        # An error tryEval cannot catch (abort, type errors) or a package set
        # that does not load at all. Load the set alone to tell them apart,
        # then evaluate the names one by one.
        probe = _evaluate([], source, system, settings, deadline, strict=True)
        if probe.returncode != 0:
            raise NixUnavailable("cannot load the package set: " + error_message(probe.stderr))
        if _SERVER_FAULT.search(result.stderr):
            raise NixUnavailable(error_message(result.stderr))
        answer: dict[str, Any] = {"packages": {}, "unknown": [], "failed": []}
        messages: list[str] = []
        for name in packages:
            single = _evaluate([name], source, system, settings, deadline, strict=True)
            if single.returncode == 0:
                part = _parse_evaluation(single)
                answer["packages"].update(part["packages"])
                answer["unknown"] += part["unknown"]
            else:
                answer["failed"].append(name)
                messages.append(f"{name}: " + error_message(single.stderr).removeprefix("error: "))
    else:
        answer = _parse_evaluation(result)
        messages = []
        # Unknown names are reported first; only then are messages worth the time.
        for name in [] if answer["unknown"] else answer["failed"][:MAX_FAILED_PROBES]:
            single = _evaluate([name], source, system, settings, deadline, strict=True)
            messages.append(f"{name}: " + error_message(single.stderr, "evaluation failed").removeprefix("error: "))
    if answer["unknown"]:
        raise UnknownPackages(answer["unknown"])
    if answer["failed"]:
        text = "\n".join(messages)
        if len(answer["failed"]) > len(messages):
            text += "\n(and " + ", ".join(answer["failed"][len(messages):]) + ")"
        raise PackageFailed(answer["failed"], _bound(text))
    return answer["packages"]


def _bound(text: str) -> str:
    return text if len(text) <= MESSAGE_MAX_CHARS else text[: MESSAGE_MAX_CHARS - 3].rstrip() + "..."


def _realise(
    resolved: dict[str, dict[str, str]], settings: NixSettings, gc_root_dir: str, deadline: _Deadline
) -> None:
    installables = sorted({f"{p['drvPath']}!{p['outputName']}" for p in resolved.values()})
    if not installables:
        return
    budget = deadline.whole_seconds()
    args = [
        _binary(settings, "nix-store"),
        "--realise",
        "--quiet",  # build logs go into the error message ("last N log lines")
        "--no-build-output",
        *_options(settings, timeout=budget),
        "--add-root",
        os.path.join(gc_root_dir, "r"),
        "--indirect",
        *installables,
    ]
    # Nix's own timeout (--timeout) should fire first: it names the build.
    result = _run(args, deadline, "the build", slack=REALISE_SLACK, running=settings.running)
    if result.returncode == 0:
        return
    message = error_message(result.stderr, "the build failed")
    failed_drvs = set(re.findall(r"builder for '(/nix/store/[^']+\.drv)' failed", result.stderr))
    failed_drvs |= set(re.findall(r"dependencies of derivation '(/nix/store/[^']+\.drv)' failed", result.stderr))
    failed_names = [n for n, p in resolved.items() if p["drvPath"] in failed_drvs]
    # Nix sets bits over 0x60: 0x04 build failure, 0x01 timeout, 0x02 hash mismatch.
    nix_status = result.returncode & ~0x0F == 0x60
    if nix_status and result.returncode & 0x01:
        raise NixTimeout(message)
    if failed_drvs or (nix_status and result.returncode & 0x06):
        raise PackageFailed(failed_names or sorted(resolved), message)
    if _SERVER_FAULT.search(result.stderr):
        raise NixUnavailable(message)
    if _NO_LOCAL_BUILDS.search(result.stderr):
        # max-jobs 0 (substitute only): whatever the binary cache lacks would
        # have to be compiled here. That is the package's fault, not the server's.
        missing = _not_substitutable(resolved, installables, settings, deadline)
        raise PackageFailed(
            missing, "not in the binary cache: " + ", ".join(missing) + " (this registry does not build packages)"
        )
    if foreign := _FOREIGN_SYSTEM.search(result.stderr):
        # Not in the binary cache for that system, and this host cannot build for it.
        missing = _not_substitutable(resolved, installables, settings, deadline)
        raise PackageFailed(missing, f"not in the binary cache for {foreign.group(1)}: " + ", ".join(missing)
                            + f" (this registry cannot build for {foreign.group(1)})")
    raise NixError(message)


_NO_LOCAL_BUILDS = re.compile(r"unable to start any build", re.IGNORECASE)
_FOREIGN_SYSTEM = re.compile(r"a '([\w-]+)' with features \{[^}]*\} is required to build")


def _not_substitutable(
    resolved: dict[str, dict[str, str]], installables: list[str], settings: NixSettings, deadline: _Deadline
) -> list[str]:
    """The requested names whose outputs would have to be built: `--dry-run` lists their derivations."""
    args = [_binary(settings, "nix-store"), "--realise", "--dry-run", *_options(settings), *installables]
    result = _run(args, deadline, "asking the binary cache", running=settings.running)
    to_build = set(re.findall(r"^\s*(/nix/store/\S+\.drv)\s*$", result.stderr, re.MULTILINE))
    names = sorted(name for name, p in resolved.items() if p["drvPath"] in to_build)
    # Only dependencies missing: every requested name needs them.
    return names or sorted(resolved)


def _path_info(paths: list[str], settings: NixSettings, deadline: _Deadline) -> dict[str, StorePath]:
    if not paths:
        return {}
    args = [
        _binary(settings, "nix"),
        "path-info",
        "--recursive",
        "--json",
        *_options(settings),
        *paths,
    ]
    result = _run(args, deadline, "reading the closure", running=settings.running)
    if result.returncode != 0:
        raise NixError("cannot read the closure: " + error_message(result.stderr))
    try:
        return parse_path_info(result.stdout)
    except (ValueError, KeyError, TypeError) as e:
        raise NixError(f"unreadable nix path-info output: {e}") from None


def parse_path_info(text: str) -> dict[str, StorePath]:
    """Nix 2.8 prints a list of objects with `path`; Nix >= 2.19 an object keyed by path."""
    data = json.loads(text)
    items = data.items() if isinstance(data, dict) else ((entry["path"], entry) for entry in data)
    paths: dict[str, StorePath] = {}
    for path, info in items:
        if info is None:  # newer Nix: a path that is not valid
            raise KeyError(f"{path} is not in the store")
        references = tuple(sorted(r for r in info.get("references", ()) if r != path))
        paths[path] = StorePath(path=path, nar_size=int(info["narSize"]), references=references,
                                nar_hash=str(info.get("narHash") or ""))
    return paths


# ---------------------------------------------------------------------------
# Entry points


def realise(
    packages: list[str], source: "PackageSource", system: str, settings: NixSettings, work_dir: str,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> Closure:
    """Resolve, build and describe the runtime closure of `packages`.

    `on_phase` hears "evaluating", then "realising" once the names have resolved.
    The returned closure's paths stay alive until `gc_root_dir` is deleted.
    Raises UnknownPackages, PackageFailed, NixTimeout, NixUnavailable or NixError.
    """
    deadline = _Deadline(settings.timeout)
    os.makedirs(work_dir, exist_ok=True)
    # The derivations written by the evaluation have no GC root until the realisation
    # adds one, so no garbage collection may run in between.
    with _store_lock(settings, fcntl.LOCK_SH):
        started = time.monotonic()
        on_phase("evaluating")
        resolved = resolve(list(packages), source, system, settings, deadline)
        evaluated = time.monotonic()
        on_phase("realising")
        gc_root_dir = tempfile.mkdtemp(prefix="roots-", dir=work_dir)
        try:
            _realise(resolved, settings, gc_root_dir, deadline)
            roots = {name: p["path"] for name, p in resolved.items()}
            paths = _path_info(sorted(set(roots.values())), settings, deadline)
        except BaseException:
            _remove_roots(gc_root_dir)
            raise
    return Closure(
        roots=roots,
        paths=paths,
        gc_root_dir=gc_root_dir,
        resolved=resolved,
        seconds={"evaluate": evaluated - started, "substitute": time.monotonic() - evaluated},
        attrs={name: p["attr"] for name, p in resolved.items()},
        info={name: p.get("info") or {} for name, p in resolved.items()},
        source_time=max((p["sourceTime"] for p in resolved.values() if isinstance(p.get("sourceTime"), int)),
                        default=None),
    )


def fetch_package_set(source: "PackageSource", system: str, settings: NixSettings) -> bool:
    """Fetch and load the package set alone (`nix/image.nix` asked for no names); whether it loaded.

    Concurrent evaluations of a set not fetched yet would each download and unpack it; one
    fetch first lets the others find it in Nix's fetch cache and the store.
    """
    with _store_lock(settings, fcntl.LOCK_SH):
        return _evaluate([], source, system, settings, _Deadline(settings.timeout), strict=True).returncode == 0


def realise_paths(paths: Sequence[str], settings: NixSettings, gc_root_dir: str) -> None:
    """Make store paths valid here by path alone, from the local store or a binary cache.

    Needs no package set and no evaluation (`nix-store --realise /nix/store/...`
    substitutes a path and its closure). The paths get GC roots in `gc_root_dir`.
    Raises NixError when a path can be neither found nor substituted.
    """
    if not paths:
        return
    deadline = _Deadline(settings.timeout)
    args = [
        _binary(settings, "nix-store"),
        "--realise",
        "--quiet",
        *_options(settings, timeout=deadline.whole_seconds()),
        "--add-root",
        os.path.join(gc_root_dir, "p"),
        "--indirect",
        *sorted(set(paths)),
    ]
    with _store_lock(settings, fcntl.LOCK_SH):
        result = _run(args, deadline, "substituting store paths", slack=REALISE_SLACK, running=settings.running)
    if result.returncode != 0:
        raise NixError("cannot realise recorded store paths: " + error_message(result.stderr))


@contextlib.contextmanager
def _store_lock(settings: NixSettings, mode: int):
    """`settings.store_lock`, taken in `mode`; BlockingIOError when `mode` has LOCK_NB and it is taken."""
    if settings.store_lock is None:
        yield
        return
    os.makedirs(os.path.dirname(settings.store_lock), exist_ok=True)
    with open(settings.store_lock, "a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Sizes of finished store paths (immutable), by their path on disk: only new paths are walked.
_PATH_BYTES: dict[str, int] = {}
_PATH_BYTES_LOCK = threading.Lock()
# Nix sets a path's mtime to 1 once it is complete and registered; a path being written has a real one.
_CANONICAL_MTIME = 1


def init_store(settings: NixSettings) -> None:
    """Create the store's database and folders, once, before builds run at once.

    Nix creates them on first use, and two processes doing that together on a new
    (chroot) store fail ("database is busy", "creating symlink ... File exists"):
    on the function every instance starts with an empty store, and an index request
    starts one build per platform at the same moment.
    """
    result = _run([_binary(settings, "nix-store"), "--init", *_options(settings)],
                  _Deadline(settings.timeout), "opening the store", running=settings.running)
    if result.returncode != 0:
        raise NixUnavailable("cannot open the Nix store: " + error_message(result.stderr))


def store_bytes_used(settings: NixSettings) -> int:
    """Bytes the store holds: the sizes of the files under its root (a chroot store's database too).

    Not statvfs of its filesystem: that also counts whatever else lives there (all of /tmp on
    the function), and under gVisor statvfs of an in-memory /tmp reports about 2^63 bytes.
    Finished store paths never change, so each is walked once per process.
    """
    root = settings.store or "/nix/store"
    store_dir = os.path.join(root, "nix", "store") if settings.store else root
    total, present = 0, set()
    try:
        entries = list(os.scandir(store_dir))
    except OSError:
        entries = []
    for entry in entries:
        present.add(entry.path)
        with _PATH_BYTES_LOCK:
            known = _PATH_BYTES.get(entry.path)
        if known is not None:
            total += known
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
            size = tree_bytes(entry.path) if entry.is_dir(follow_symlinks=False) else stat.st_size
        except OSError:  # collected meanwhile
            continue
        if stat.st_mtime == _CANONICAL_MTIME and not entry.name.startswith("."):
            with _PATH_BYTES_LOCK:
                _PATH_BYTES[entry.path] = size
        total += size
    with _PATH_BYTES_LOCK:  # forget collected paths (a path of this store is under store_dir)
        for path in [p for p in _PATH_BYTES if os.path.dirname(p) == store_dir and p not in present]:
            del _PATH_BYTES[path]
    if settings.store:
        total += tree_bytes(root, skip=store_dir)  # the database, GC roots, profiles
    return total


def tree_bytes(root: str, skip: str | None = None) -> int:
    """Sum of the sizes of the regular files and links under `root` (but not `skip`), links not followed."""
    total, pending = 0, [root]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:  # gone meanwhile (a concurrent garbage collection), or unreadable
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.path != skip:
                            pending.append(entry.path)
                    else:
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


def collect_garbage(settings: NixSettings) -> bool:
    """Delete every store path no GC root holds; False, doing nothing, while a build runs.

    Images already built lose nothing: their layers are in storage. The next build
    substitutes again what it needs (and re-fetches a package set that was collected).
    """
    if settings.store_lock is None:
        raise ValueError("garbage collection needs a store lock shared with the builds")
    try:
        with _store_lock(settings, fcntl.LOCK_EX | fcntl.LOCK_NB):
            result = _run([_binary(settings, "nix-store"), "--gc", *_options(settings)],
                          _Deadline(settings.timeout), "garbage collection")
    except BlockingIOError:
        return False
    if result.returncode != 0:
        raise NixError(error_message(result.stderr, "garbage collection failed"))
    return True


def _remove_roots(gc_root_dir: str) -> None:
    for entry in os.scandir(gc_root_dir):
        os.unlink(entry.path)
    os.rmdir(gc_root_dir)


def store_path_on_disk(path: str, store_root: str | None) -> str:
    """Where the files of logical store path `path` are: under chroot store `store_root`, if any."""
    return os.path.join(store_root or "/", path.lstrip("/"))
