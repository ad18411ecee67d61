import pytest

from builder import errors, names
from builder.manifest import (
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, IndexEntry, choose_index_type, choose_media_type,
    image_index, manifest_media_type, omitted_platforms,
)

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast


def parse(name, always=("cacert", "iana-etc"), max_packages=64, max_length=1024):
    return names.parse_image_name(name, always_include=always, max_packages=max_packages, max_length=max_length)


def test_packages_are_sorted_deduplicated_with_always_included():
    assert parse("hello/goodbye/hello").packages == ("cacert", "goodbye", "hello", "iana-etc")
    assert parse("goodbye/hello") == parse("hello/goodbye").__class__(
        name="goodbye/hello", packages=parse("hello/goodbye").packages, architecture="amd64",
        requested=("goodbye", "hello"), title="goodbye/hello")


def test_shell_meta_package_and_arm64():
    image = parse("shell/hello", always=())
    assert image.packages == ("bashInteractive", "coreutils", "hello", "moreutils", "nano")
    arm = parse("arm64/shell/hello", always=())
    assert arm.architecture == "arm64" and arm.system == "aarch64-linux"
    assert arm.packages == image.packages
    assert parse("shell/arm64/hello", always=()).architecture == "arm64"
    # Only at the front: later "shell" is an ordinary package name.
    assert parse("hello/shell", always=()).packages == ("hello", "shell")
    assert parse("shell", always=()).packages == names.SHELL_PACKAGES


def test_nonroot_meta_package_in_any_order_among_the_meta_packages():
    for name in ("nonroot/shell/hello", "shell/nonroot/hello", "arm64/nonroot/shell/hello", "nonroot/arm64/hello"):
        image = parse(name, always=())
        assert image.nonroot, name
        assert "nonroot" not in image.packages and "hello" in image.packages
    assert not parse("shell/hello").nonroot
    # Only at the front, like the others.
    assert parse("hello/nonroot", always=()).packages == ("hello", "nonroot")
    with pytest.raises(errors.NameInvalid, match="names no package"):
        parse("nonroot", always=())


def test_requested_packages_leave_out_meta_and_always_included_ones():
    assert parse("shell/hello").requested == ("hello",)
    assert parse("nonroot/hello/cacert").requested == ("hello",)
    assert parse("shell").requested == ()
    assert parse("goodbye/hello/goodbye").requested == ("goodbye", "hello")


def test_dotted_attribute_paths_are_kept():
    assert "demopackages.nested" in parse("demopackages.nested").packages


@pytest.mark.parametrize("bad", ["Hello", "hello//x", "-x", "x-", "a b", "x/", "../etc", "x;rm", "a__-b", "${x}", '"x"'])
def test_names_outside_the_grammar_are_rejected(bad):
    with pytest.raises(errors.NameInvalid):
        parse(bad)


def test_bounds():
    with pytest.raises(errors.NameInvalid, match="at most 3 packages"):
        parse("a/b/c/d", always=(), max_packages=3)
    with pytest.raises(errors.NameInvalid, match="longer than 10"):
        parse("abcdefghijk", max_length=10)


def test_tags_and_digests():
    names.check_tag("latest")
    names.check_tag("0" * 40)
    for bad in ["", ".x", "x" * 129, "a/b", "a:b"]:
        with pytest.raises(errors.ManifestUnknown, match="invalid tag"):
            names.check_tag(bad)
    names.check_digest("sha256:" + "a" * 64)
    for bad in ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "a" * 32, "sha256:" + "g" * 64, "sha256"]:
        with pytest.raises(errors.DigestInvalid):
            names.check_digest(bad)


def test_image_key_is_unambiguous():
    a = names.ImageRequest("x", ("a,b",), "amd64")
    b = names.ImageRequest("x", ("a", "b"), "amd64")
    assert names.image_key(a, "s") != names.image_key(b, "s")
    assert names.image_key(b, "s") != names.image_key(b, "t")
    assert names.image_key(b, "s") != names.image_key(names.ImageRequest("x", ("a", "b"), "arm64"), "s")
    assert names.image_key(b, "s") != names.image_key(
        names.ImageRequest("x", ("a", "b"), "amd64", nonroot=True, title="nonroot/x"), "s")


def test_every_spelling_of_an_image_has_one_title():
    assert parse("htop/git").title == parse("git/htop").title == "git/htop"
    assert parse("shell/nonroot/hello").title == parse("nonroot/shell/hello/hello").title == "nonroot/shell/hello"
    assert parse("arm64/hello/cacert").title == "arm64/hello"
    assert parse("shell").title == "shell"


def test_media_type_from_accept_lines():
    assert choose_media_type([]) == DOCKER_MANIFEST
    assert choose_media_type(["*/*"]) == DOCKER_MANIFEST
    assert choose_media_type([OCI_MANIFEST]) == OCI_MANIFEST
    # Go clients send one line per type: all are read, the first listed wins.
    assert choose_media_type(["application/vnd.oci.image.index.v1+json", OCI_MANIFEST, DOCKER_MANIFEST]) == OCI_MANIFEST
    assert choose_media_type([f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"]) == DOCKER_MANIFEST
    assert choose_media_type([f"{DOCKER_MANIFEST};q=0.5, {OCI_MANIFEST}"]) == OCI_MANIFEST
    assert choose_media_type([f"{OCI_MANIFEST};q=0"]) == DOCKER_MANIFEST


def test_index_flavour_is_oci_whenever_accepted_and_none_for_single_manifest_clients():
    assert choose_index_type([DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST]) == OCI_INDEX
    assert choose_index_type([f"{DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}"]) == DOCKER_MANIFEST_LIST
    assert choose_index_type([f"{OCI_INDEX};q=0, {DOCKER_MANIFEST_LIST}"]) == DOCKER_MANIFEST_LIST
    assert choose_index_type([OCI_MANIFEST, DOCKER_MANIFEST]) is None
    assert choose_index_type([]) is None and choose_index_type(["*/*"]) is None


def test_an_index_notes_its_omitted_platforms_and_reads_them_back():
    entry = IndexEntry("linux/amd64", "sha256:" + "a" * 64, 123)
    data = image_index(OCI_INDEX, [entry], {"linux/arm64": "cpuid: not available"})
    assert manifest_media_type(data) == OCI_INDEX
    assert omitted_platforms(data) == {"linux/arm64": "cpuid: not available"}
    assert omitted_platforms(image_index(OCI_INDEX, [entry], {})) == {}
    assert omitted_platforms(b"not json") == {}


def test_a_platforms_name_is_the_arm64_prefixed_name():
    assert names.platform_name("shell/hello", "linux/amd64") == "shell/hello"
    assert names.platform_name("shell/hello", "linux/arm64") == "arm64/shell/hello"
    assert parse(names.platform_name("nonroot/hello", "linux/arm64")).architecture == "arm64"
    assert names.names_platform(parse("arm64/hello")) and not names.names_platform(parse("hello/arm64"))
