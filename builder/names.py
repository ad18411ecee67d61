"""Image names: what a client asks for, checked before anything else runs.

`/v2/shell/git/htop/manifests/latest` asks for git and htop plus the shell meta-package
(Nixery's rules: README "Image names"). Names, tags and digests are validated against the spec's
grammar and bounds here, so no Nix process starts for a name that fails, and nothing a client
sends reaches Nix except as a JSON string of checked package names.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from .errors import DigestInvalid, ManifestUnknown, NameInvalid

# The distribution spec's grammar for one path component, and for tags and digests.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
SHA256_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")

SHELL_PACKAGES = ("bashInteractive", "coreutils", "moreutils", "nano")
ARCHITECTURES = {"amd64": "x86_64-linux", "arm64": "aarch64-linux"}
META_PACKAGES = ("arm64", "shell", "nonroot")
# Part of every image key: bumped when the same packages make a different image
# (v2: users and groups, labels, the default command, the SBOM).
IMAGE_FORMAT = "image-v2"


@dataclass(frozen=True)
class ImageRequest:
    name: str  # the repository name as the client sent it
    packages: tuple[str, ...]  # sorted, deduplicated, with meta-packages expanded
    architecture: str  # OCI architecture: amd64 | arm64
    nonroot: bool = False  # the `nonroot` meta-package: run as user and group 65532
    # The packages the name asked for itself: no meta-package's, no always-included one.
    requested: tuple[str, ...] = ()
    # The name in one spelling for all names that mean this image (meta-packages, then the
    # requested packages, each sorted): `htop/git` and `git/htop` are both `git/htop`.
    title: str = ""

    @property
    def system(self) -> str:
        return ARCHITECTURES[self.architecture]


def check_repository(name: str, max_length: int) -> None:
    if len(name) > max_length:
        raise NameInvalid(f"repository name is longer than {max_length} characters", {"name": name[:100]})
    components = name.split("/")
    for component in components:
        if not _COMPONENT.fullmatch(component):
            raise NameInvalid(
                f"invalid repository name component {component[:100]!r}: "
                "use lower-case package names separated by '/'",
                {"name": name},
            )


def parse_image_name(name: str, *, always_include: tuple[str, ...], max_packages: int, max_length: int) -> ImageRequest:
    check_repository(name, max_length)
    segments = name.split("/")
    architecture = "amd64"
    packages: list[str] = []
    # Meta-packages count only at the front, as in Nixery: `shell/arm64/x` and `arm64/shell/x`.
    nonroot = False
    metas: set[str] = set()
    while segments and segments[0] in META_PACKAGES:
        head = segments.pop(0)
        metas.add(head)
        if head == "arm64":
            architecture = "arm64"
        elif head == "nonroot":
            nonroot = True
        else:
            packages.extend(SHELL_PACKAGES)
    packages.extend(segments)
    if not segments and not packages:
        raise NameInvalid("the image name names no package", {"name": name})
    requested = tuple(sorted(set(segments) - set(always_include)))
    wanted = sorted(set(packages) | set(always_include))
    if len(wanted) > max_packages:
        raise NameInvalid(f"an image holds at most {max_packages} packages, this name asks for {len(wanted)}", {"name": name})
    return ImageRequest(name=name, packages=tuple(wanted), architecture=architecture, nonroot=nonroot,
                        requested=requested,
                        title="/".join([*sorted(metas), *requested]) or "/".join(sorted(set(segments))))


def check_tag(tag: str) -> None:
    # On the pull side a reference that cannot be a tag names no manifest: the spec (and its
    # conformance suite) want 404 here; TAG_INVALID is for pushes.
    if not TAG.fullmatch(tag):
        raise ManifestUnknown(f"invalid tag {tag[:140]!r}: tags match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}",
                              {"tag": tag[:140]})


def is_digest(reference: str) -> bool:
    return ":" in reference


def check_digest(digest: str) -> None:
    if not DIGEST.fullmatch(digest) or not digest.startswith("sha256:") or not SHA256_DIGEST.fullmatch(digest):
        raise DigestInvalid(f"invalid digest {digest[:140]!r}: expected sha256:<64 hex digits>", {"digest": digest[:140]})


def image_key(request: ImageRequest, source_identity: str) -> str:
    """An unambiguous cache key: JSON keeps separators inside names from colliding.

    The title is in it because it is in the image (a label); it also tells `nonroot` apart.
    """
    return json.dumps([request.architecture, list(request.packages), source_identity, IMAGE_FORMAT, request.title],
                      separators=(",", ":"))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def platform_name(name: str, platform: str) -> str:
    """The name a client gives the image of `name` on `platform` ("linux/arm64"): `arm64/<name>`."""
    architecture = platform.split("/", 1)[1]
    return name if architecture == "amd64" else f"{architecture}/{name}"


def names_platform(request: ImageRequest) -> bool:
    """Whether the name itself chose a platform (`arm64/...`): such a name means one image, no index."""
    return request.architecture != "amd64"
