"""What an image holds besides its packages: users, non-root, the default command, labels, the SBOM.

Real builds of the demo set, read over HTTP as a client reads them.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import requests
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder.manifest import OCI_MANIFEST

DEMO = Path(__file__).resolve().parent.parent / "nix" / "demo"

OCI = {"Accept": OCI_MANIFEST}


def image(registry, name: str, tag: str = "latest") -> tuple[dict, dict]:
    """(manifest, config) of an image."""
    response = registry.get(f"/v2/{name}/manifests/{tag}", headers=OCI)
    assert response.status_code == 200, response.text
    manifest = response.json()
    config = registry.get(f"/v2/{name}/blobs/{manifest['config']['digest']}").json()
    return manifest, config


def top_layer(registry, name: str) -> dict[str, tarfile.TarInfo | bytes]:
    """The customisation layer's members by name, with file contents under `name + ':data'`."""
    manifest, _ = image(registry, name)
    blob = registry.get(f"/v2/{name}/blobs/{manifest['layers'][-1]['digest']}").content
    members: dict = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        for member in tar:
            members[member.name] = member
            if member.isfile():
                members[member.name + ":data"] = tar.extractfile(member).read()
    return members


def test_every_image_has_root_and_nobody_and_an_nsswitch_conf(shared_registry):
    layer = top_layer(shared_registry, "hello")
    passwd = layer["etc/passwd:data"].decode().splitlines()
    assert [line.split(":")[:4] for line in passwd] == [["root", "x", "0", "0"], ["nobody", "x", "65534", "65534"]]
    group = layer["etc/group:data"].decode().splitlines()
    assert [line.split(":")[:3] for line in group] == [["root", "x", "0"], ["nobody", "x", "65534"]]
    nsswitch = layer["etc/nsswitch.conf:data"].decode()
    assert "passwd: files" in nsswitch and "group: files" in nsswitch and "hosts: files dns" in nsswitch
    for name in ("etc/passwd", "etc/group", "etc/nsswitch.conf"):
        assert layer[name].isfile() and layer[name].mode == 0o644 and layer[name].uid == 0
    assert "home/nonroot" not in layer
    _, config = image(shared_registry, "hello")
    assert "User" not in config["config"]  # root, as in Nixery


def test_nonroot_adds_user_65532_with_its_home_and_runs_as_it(shared_registry):
    layer = top_layer(shared_registry, "nonroot/shell/hello")
    assert "nonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh" in layer["etc/passwd:data"].decode().splitlines()
    assert "nonroot:x:65532:" in layer["etc/group:data"].decode().splitlines()
    home = layer["home/nonroot"]
    assert home.isdir() and (home.uid, home.gid) == (65532, 65532)
    _, config = image(shared_registry, "nonroot/shell/hello")
    assert config["config"]["User"] == "65532:65532"
    assert "HOME=/home/nonroot" in config["config"]["Env"]
    assert config["config"]["Cmd"] == ["bash"]
    # The same packages as root are another image.
    assert image(shared_registry, "shell/hello")[0] != image(shared_registry, "nonroot/shell/hello")[0]


def test_single_package_image_runs_its_main_program_as_cmd_never_entrypoint(shared_registry):
    _, config = image(shared_registry, "hello")
    [program] = config["config"]["Cmd"]
    assert program.startswith("/nix/store/") and program.endswith("-hello-2.12.1/bin/hello")
    assert "Entrypoint" not in config["config"]
    # meta.mainProgram differs from the attribute name.
    assert image(shared_registry, "7zip")[1]["config"]["Cmd"][0].endswith("-7zip-23.01/bin/7z")


def test_no_default_command_without_exactly_one_package_with_a_main_program(shared_registry):
    # Two requested packages: which one would run?
    assert "Cmd" not in image(shared_registry, "goodbye/hello")[1]["config"]
    # No meta.mainProgram.
    assert "Cmd" not in image(shared_registry, "demopackages.nested")[1]["config"]
    # With the shell, bash stays the command.
    assert image(shared_registry, "shell/hello")[1]["config"]["Cmd"] == ["bash"]


def test_provenance_labels_and_annotations_carry_the_oci_keys(shared_registry):
    manifest, config = image(shared_registry, "hello")
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "hello"
    assert labels["org.opencontainers.image.version"] == "2.12.1"
    assert labels["org.opencontainers.image.licenses"] == "GPL-3.0-or-later"
    assert labels["org.opencontainers.image.url"] == "https://www.gnu.org/software/hello/"
    # A local package set: its content hash is the revision; a server's folder is no source.
    assert labels["org.opencontainers.image.revision"].startswith("sha256:")
    assert len(labels["org.opencontainers.image.revision"]) == len("sha256:") + 64
    assert "org.opencontainers.image.source" not in labels
    # No commit time is known for a path: the fixed time keeps digests reproducible.
    assert labels["org.opencontainers.image.created"] == config["created"] == "1970-01-01T00:00:01Z"
    assert manifest["annotations"] == labels
    # Schema2 manifests have no annotations; the labels are in the config all the same.
    docker = shared_registry.get("/v2/hello/manifests/latest",
                                 headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}).json()
    assert "annotations" not in docker and docker["config"]["digest"] == manifest["config"]["digest"]


def test_several_packages_have_no_version_or_license_label_and_one_title_for_every_spelling(shared_registry):
    manifest, config = image(shared_registry, "goodbye/hello")
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "goodbye/hello"
    assert "org.opencontainers.image.version" not in labels and "org.opencontainers.image.licenses" not in labels
    # Another spelling of the same image is the same image, to the byte.
    assert image(shared_registry, "hello/goodbye")[0] == manifest
    # Licenses without an SPDX id are LicenseRefs.
    labels = image(shared_registry, "7zip")[1]["config"]["Labels"]
    assert labels["org.opencontainers.image.licenses"] == "LGPL-2.1-or-later AND LicenseRef-unRAR-restriction"


def test_a_git_package_set_labels_its_commit_its_repository_and_its_commit_time(start_registry, tmp_path):
    repo = tmp_path / "pkgs"
    shutil.copytree(DEMO, repo)
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path), "GIT_AUTHOR_NAME": "T",
           "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.org",
           "GIT_AUTHOR_DATE": "2024-01-02T03:04:05Z", "GIT_COMMITTER_DATE": "2024-01-02T03:04:05Z"}
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "demo"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True, env=env).stdout.strip()
    registry = start_registry({"NIXERY_PKGS_PATH": "", "NIXERY_PKGS_REPO": str(repo)})
    manifest, config = image(registry, "hello")
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == commit
    assert labels["org.opencontainers.image.source"] == str(repo)
    assert labels["org.opencontainers.image.created"] == config["created"] == "2024-01-02T03:04:05Z"
    assert manifest["annotations"] == labels


def test_two_instances_that_share_nothing_build_the_same_digests(start_registry, tmp_path):
    digests = []
    for n in range(2):
        registry = start_registry(state_dir=tmp_path / f"instance{n}")
        seen = []
        for accept in (OCI, {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}):
            digest = registry.head("/v2/nonroot/shell/hello/manifests/latest", headers=accept).headers[
                "Docker-Content-Digest"]
            seen += [digest, registry.get(f"/v2/nonroot/shell/hello/referrers/{digest}").json()["manifests"]]
        digests.append(seen)
    assert digests[0] == digests[1]
    assert all(referrers for referrers in digests[0][1::2])


# -- the SBOM and the referrers API ----------------------------------------------------------

CYCLONEDX = "application/vnd.cyclonedx+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


def referrers_of(registry, name: str, digest: str, **params) -> requests.Response:
    response = registry.get(f"/v2/{name}/referrers/{digest}", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == INDEX
    return response


def sbom_of(registry, name: str, headers=OCI) -> tuple[str, dict, dict]:
    """(image manifest digest, artifact manifest, SBOM document) of an image."""
    digest = registry.head(f"/v2/{name}/manifests/latest", headers=headers).headers["Docker-Content-Digest"]
    [descriptor] = referrers_of(registry, name, digest).json()["manifests"]
    artifact = registry.get(f"/v2/{name}/manifests/{descriptor['digest']}", headers=OCI)
    assert artifact.status_code == 200 and artifact.headers["Content-Type"] == OCI_MANIFEST
    assert descriptor["size"] == len(artifact.content) and descriptor["artifactType"] == CYCLONEDX
    [layer] = artifact.json()["layers"]
    document = registry.get(f"/v2/{name}/blobs/{layer['digest']}")
    assert hashlib.sha256(document.content).hexdigest() == layer["digest"].removeprefix("sha256:")
    return digest, artifact.json(), document.json()


def store_paths_in_layers(registry, name: str) -> set[str]:
    manifest, _ = image(registry, name)
    paths = set()
    for layer in manifest["layers"][:-1]:  # the last one is the customisation layer
        blob = registry.get(f"/v2/{name}/blobs/{layer['digest']}").content
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
            paths |= {"/" + "/".join(m.name.split("/")[:3]) for m in tar if m.name.count("/") >= 2}
    return paths


def test_every_manifest_of_an_image_has_its_sbom_as_an_oci_artifact_referrer(shared_registry):
    for headers, media_type in ((OCI, OCI_MANIFEST), (DOCKER, DOCKER["Accept"])):
        digest, artifact, _ = sbom_of(shared_registry, "shell/hello", headers)
        assert artifact["artifactType"] == CYCLONEDX
        assert artifact["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
        assert artifact["config"]["size"] == 2
        assert shared_registry.get(f"/v2/shell/hello/blobs/{artifact['config']['digest']}").content == b"{}"
        assert artifact["layers"][0]["mediaType"] == CYCLONEDX
        size = len(shared_registry.get(f"/v2/shell/hello/manifests/{digest}", headers=headers).content)
        assert artifact["subject"] == {"mediaType": media_type, "digest": digest, "size": size}


def test_the_sbom_is_valid_cyclonedx_listing_the_exact_closure(shared_registry):
    _, artifact, document = sbom_of(shared_registry, "shell/hello")
    text = json.dumps(document)
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert errors is None, errors
    components = {c["bom-ref"]: c for c in document["components"]}
    assert set(components) == store_paths_in_layers(shared_registry, "shell/hello")
    for ref, component in components.items():
        properties = {p["name"]: p["value"] for p in component["properties"]}
        assert properties["nix:store_path"] == ref and int(properties["nix:nar_size"]) > 0
        assert properties["nix:nar_hash"].startswith("sha256")
        assert component["hashes"][0]["alg"] == "SHA-256" and len(component["hashes"][0]["content"]) == 64
    hello = next(c for c in components.values() if c["name"] == "hello")
    assert hello["version"] == "2.12.1" and hello["licenses"] == [{"license": {"id": "GPL-3.0-or-later"}}]
    assert hello["description"] == "A program that produces a familiar, friendly greeting"
    assert hello["externalReferences"] == [{"type": "website", "url": "https://www.gnu.org/software/hello/"}]
    # Paths nobody asked for are named from their store path.
    libgreeting = next(c for c in components.values() if c["name"] == "libgreeting")
    assert libgreeting["version"] == "1.0" and "licenses" not in libgreeting
    # Dependencies follow the store's references; the image depends on what was asked for.
    depends = {d["ref"]: set(d.get("dependsOn", [])) for d in document["dependencies"]}
    assert depends[hello["bom-ref"]] == {libgreeting["bom-ref"],
                                         next(r for r in components if r.endswith("-busybox-1.35.0"))}
    image_ref = document["metadata"]["component"]["bom-ref"]
    assert hello["bom-ref"] in depends[image_ref] and len(depends[image_ref]) == 7  # shell (4), hello, always (2)
    assert document["metadata"]["component"]["type"] == "container"
    assert document["metadata"]["timestamp"].startswith("1970-01-01T00:00:01")


def test_referrers_filter_by_artifact_type_and_answer_an_empty_index_for_unknown_digests(shared_registry):
    digest = shared_registry.head("/v2/hello/manifests/latest", headers=OCI).headers["Docker-Content-Digest"]
    matching = referrers_of(shared_registry, "hello", digest, artifactType=CYCLONEDX)
    assert matching.headers["OCI-Filters-Applied"] == "artifactType"
    assert len(matching.json()["manifests"]) == 1
    other = referrers_of(shared_registry, "hello", digest, artifactType="application/spdx+json")
    assert other.headers["OCI-Filters-Applied"] == "artifactType" and other.json()["manifests"] == []
    assert "OCI-Filters-Applied" not in referrers_of(shared_registry, "hello", digest).headers
    unknown = referrers_of(shared_registry, "hello", "sha256:" + "0" * 64)
    assert unknown.json() == {"schemaVersion": 2, "mediaType": INDEX, "manifests": []}
    bad = shared_registry.get("/v2/hello/referrers/sha256:xyz")
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "DIGEST_INVALID"


def test_referrers_tag_schema_serves_the_same_index_and_404_when_none(shared_registry):
    digest = shared_registry.head("/v2/hello/manifests/latest", headers=OCI).headers["Docker-Content-Digest"]
    tag = digest.replace(":", "-")
    by_tag = shared_registry.get(f"/v2/hello/manifests/{tag}", headers={"Accept": INDEX})
    assert by_tag.status_code == 200 and by_tag.headers["Content-Type"] == INDEX
    assert by_tag.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(by_tag.content).hexdigest()
    assert by_tag.json()["manifests"] == referrers_of(shared_registry, "hello", digest).json()["manifests"]
    missing = shared_registry.get("/v2/hello/manifests/sha256-" + "0" * 64)
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


ODD_META = '''
{ system ? builtins.currentSystem, ... }:
let demo = import DEMO { inherit system; }; in {
  oddMeta = demo.hello // {
    version = throw "no version";
    meta = { license = "unfree-ish"; homepage = [ "https://a.example" "https://b.example" ];
             mainProgram = 42; description = throw "no description"; };
  };
  throwingMeta = demo.goodbye // { meta = throw "meta throws"; };
}
'''


def test_odd_or_throwing_meta_never_fails_a_build(tmp_path):
    from builder import nix, sources

    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "default.nix").write_text(ODD_META.replace("DEMO", str(DEMO)))
    source = sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(tmp_path / "pkgs"))
    closure = nix.realise(["oddMeta", "throwingMeta"], source, "x86_64-linux", nix.NixSettings(timeout=300),
                          str(tmp_path / "work"))
    assert closure.info["oddMeta"] == {"pname": "hello", "version": None, "mainProgram": None, "description": None,
                                       "homepage": "https://a.example",
                                       "licenses": [{"spdxId": None, "name": "unfree-ish"}]}
    assert closure.info["throwingMeta"] == {"pname": "goodbye", "version": "1.0", "mainProgram": None,
                                            "description": None, "homepage": None, "licenses": []}


def test_referrers_lapse_with_the_blobs_when_storage_expires_them(start_registry, tmp_path):
    import time

    from builder.cache.sqlite import SqliteCache

    registry = start_registry({"LAYER_EXPIRY_DAYS": "2"}, state_dir=tmp_path / "state")
    digest = registry.head("/v2/hello/manifests/latest", headers=OCI).headers["Docker-Content-Digest"]
    cache = SqliteCache(str(tmp_path / "state" / "cache.sqlite"))
    now = time.time()
    assert cache.get_facts("referrers", [digest], now + 0.9 * 86400)  # a day before the blobs go
    assert not cache.get_facts("referrers", [digest], now + 1.1 * 86400)
