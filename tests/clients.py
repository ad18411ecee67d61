"""Where the registry clients used by the tests live, and how to drive the conformance suite.

Debian packages skopeo, podman, docker, containerd (ctr) and umoci; `scripts/build-tools` builds
the rest into `.tools/bin/` from pinned Go modules:

- ``crane`` (github.com/google/go-containerregistry/cmd/crane v0.22.1);
- ``oras`` (oras.land/oras/cmd/oras v1.3.6), a referrers client;
- ``conformance.test``: the OCI distribution-spec conformance suite,
  github.com/opencontainers/distribution-spec/conformance at
  v0.0.0-20231101194043-f2182352d4cc, compiled with ``go test -c``.

The pinned versions live in ``scripts/build-tools``; ``TOOLS_BIN`` overrides the folder.

A missing binary is an error, never a skip: the tests exist to prove the registry against real
clients.

Conformance suite, read-only pull mode
--------------------------------------
That revision of the suite (a Ginkgo test package, ``TestConformance``) is configured only
through the environment, read once at process start (``setup.go``):

``OCI_ROOT_URL``
    Registry base URL, e.g. ``http://127.0.0.1:5000``; the suite panics at start without it.
``OCI_NAMESPACE``
    Repository name every request goes to (``/v2/<namespace>/...``).
``OCI_TEST_PULL=1``, ``OCI_TEST_PUSH=0``, ``OCI_TEST_CONTENT_DISCOVERY=1``,
``OCI_TEST_CONTENT_MANAGEMENT=0``
    Workflows to run (parsed with Go's ``strconv.ParseBool``). Referrers and tag listing belong
    to content discovery; with ``OCI_TAG_LIST`` set it pushes nothing. Two of its referrers specs
    count the artifacts its own setup would push: ``CONFORMANCE_FLAGS`` skips those.
``OCI_TAG_NAME``, ``OCI_MANIFEST_DIGEST``, ``OCI_BLOB_DIGEST``
    When all three are set the pull setup (which pushes content) and teardown (which deletes it)
    are skipped: the tests read existing content instead. ``OCI_MANIFEST_DIGEST`` must be the
    digest the tag resolves to (HEAD by tag must return it as Docker-Content-Digest) and is
    fetched by digest with ``Accept: application/vnd.oci.image.manifest.v1+json`` only, so it
    must be an OCI image manifest. ``OCI_BLOB_DIGEST`` is any blob in the repository (the suite
    uses it where it would use its config blob). The newer ``OCI_RO_DATA_*`` / ``OCI_REGISTRY``
    / ``OCI_REPO1`` variables belong to later revisions of the suite (a rewrite), not this one.
``OCI_HIDE_SKIPPED_WORKFLOWS=1``
    Leaves disabled workflows out of the HTML report.
``OCI_DEBUG``
    ``1`` logs every request and response to stdout.
``OCI_REPORT_DIR``
    Where ``junit.xml`` and ``report.html`` are written (default: working directory; ``none``
    writes nothing).
``OCI_DELETE_MANIFEST_BEFORE_BLOBS``
    Teardown order; irrelevant when setup is skipped, set to 0 for clarity.
``OCI_USERNAME``, ``OCI_PASSWORD``, ``OCI_AUTH_SCOPE``, ``OCI_CROSSMOUNT_NAMESPACE``,
``OCI_AUTOMATIC_CROSSMOUNT``, ``OCI_SKIP_EMPTY_LAYER_PUSH_TEST``, ``OCI_TAG_LIST``
    Push, auth and discovery knobs; unused in pull-only mode.

The binary exits 0 only when every enabled spec passes (14 specs run in pull-only mode). Useful
flags: ``-ginkgo.no-color`` (plain output for assertion messages), ``-ginkgo.v``,
``-ginkgo.json-report FILE``. Reference point: Debian's docker-registry (distribution 2.8.2) passes
13 of 14; it answers ``GET /v2/<name>/manifests/sha256:totallywrong`` with 500 where the suite
accepts only 400 (with an OCI error body) or 404.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = Path(os.environ.get("TOOLS_BIN", REPO_ROOT / ".tools" / "bin"))

# Appended to the conformance.test command line so failure messages read as plain text. The two
# referrers specs skipped count the five artifacts the suite pushes in its own setup (a pull-only
# registry holds none of them); the referrers spec that needs no push runs.
CONFORMANCE_FLAGS = ("-ginkgo.no-color", "-ginkgo.skip=listing references.*existing blob")


class ClientMissing(RuntimeError):
    """A client binary the tests need is not installed."""


def _built_tool(name: str) -> Path:
    path = TOOLS_BIN / name
    if not os.access(path, os.X_OK):
        raise ClientMissing(f"{path} is missing: run scripts/build-tools")
    return path


def crane() -> Path:
    return _built_tool("crane")


def oras() -> Path:
    return _built_tool("oras")


def conformance_test() -> Path:
    return _built_tool("conformance.test")


def system_tool(name: str) -> Path:
    """A client Debian provides (skopeo, podman, docker, ctr, umoci, ...)."""
    found = shutil.which(name)
    if found is None:
        raise ClientMissing(f"{name} is not on PATH: run scripts/install-deps")
    return Path(found)


def conformance_env(
    root_url: str,
    namespace: str,
    tag: str,
    manifest_digest: str,
    blob_digest: str,
    report_dir: str | os.PathLike[str],
) -> dict[str, str]:
    """Environment for running the conformance suite's pull workflow against existing content.

    Returns only the suite's variables; merge it over os.environ (the binary needs PATH, HOME).
    """
    return {
        "OCI_ROOT_URL": root_url.rstrip("/"),
        "OCI_NAMESPACE": namespace,
        "OCI_TEST_PULL": "1",
        "OCI_TEST_PUSH": "0",
        # Content discovery: tag listing and the referrers API.
        "OCI_TEST_CONTENT_DISCOVERY": "1",
        # The tags the suite lists without pushing any; it pages through half of them, so two.
        "OCI_TAG_LIST": f"{tag},{tag}",
        "OCI_TEST_CONTENT_MANAGEMENT": "0",
        "OCI_TAG_NAME": tag,
        "OCI_MANIFEST_DIGEST": manifest_digest,
        "OCI_BLOB_DIGEST": blob_digest,
        "OCI_HIDE_SKIPPED_WORKFLOWS": "1",
        "OCI_DEBUG": "0",
        "OCI_DELETE_MANIFEST_BEFORE_BLOBS": "0",
        "OCI_REPORT_DIR": os.fspath(report_dir),
    }
