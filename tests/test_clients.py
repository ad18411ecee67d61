"""Real registry clients pull images from the registry and run them."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from builder.manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests import clients
from tests.registry_process import RegistryProcess

pytestmark = pytest.mark.clients
REPO_ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None, timeout=300, check=True, text=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=text, timeout=timeout,
                            env={**os.environ, **(env or {})}, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
    return result


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run scripts/install-deps"
    return path


def skopeo_to_oci(registry, image: str, layout: Path, tag: str = "latest", reference: str | None = None) -> None:
    source = f"docker://{registry.host}/{image}" + (f"@{reference}" if reference else f":{tag}")
    run(tool("skopeo"), "copy", "--src-tls-verify=false", source, f"oci:{layout}:{tag}")


def unpack_and_run(layout: Path, bundle: Path, *command: str, tag: str = "latest") -> str:
    run(tool("umoci"), "unpack", "--image", f"{layout}:{tag}", bundle)
    return run("chroot", bundle / "rootfs", *command).stdout


def test_skopeo_umoci_chroot_runs_the_image(shared_registry, tmp_path):
    skopeo_to_oci(shared_registry, "shell/hello", tmp_path / "layout")
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    assert index["manifests"][0]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    out = unpack_and_run(tmp_path / "layout", tmp_path / "bundle", "/bin/hello")
    assert "Hello, world!" in out
    rootfs = tmp_path / "bundle" / "rootfs"
    # The customisation layer: packages linked into /, /tmp, /usr/bin/env, certificates.
    assert (rootfs / "tmp").is_dir() and (rootfs / "tmp").stat().st_mode & 0o1777 == 0o1777
    assert os.readlink(rootfs / "usr/bin/env").startswith("/nix/store/")
    assert (rootfs / "etc/ssl/certs/ca-bundle.crt").exists()
    shell = run("chroot", rootfs, "/bin/bash", "-c", "echo $((6 * 7)) | /usr/bin/env cat").stdout
    assert shell.strip() == "42"


def test_skopeo_docker_schema2_and_pull_by_digest(shared_registry, tmp_path):
    head = shared_registry.head("/v2/goodbye/manifests/latest",
                                headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    digest = head.headers["Docker-Content-Digest"]
    # A docker-archive/dir destination keeps the schema2 manifest as served.
    run(tool("skopeo"), "copy", "--src-tls-verify=false", f"docker://{shared_registry.host}/goodbye@{digest}",
        f"dir:{tmp_path / 'dir'}")
    manifest = json.loads((tmp_path / "dir" / "manifest.json").read_text())
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    inspect = json.loads(run(tool("skopeo"), "inspect", "--tls-verify=false",
                             f"docker://{shared_registry.host}/goodbye:latest").stdout)
    assert inspect["Digest"].startswith("sha256:") and inspect["RepoTags"] == ["latest"]


def test_skopeo_shows_the_registry_message_for_unknown_packages(shared_registry, tmp_path):
    result = run(tool("skopeo"), "copy", "--src-tls-verify=false", f"docker://{shared_registry.host}/hello/nosuchpkg:latest",
                 f"oci:{tmp_path / 'layout'}:latest", check=False)
    assert result.returncode != 0
    assert "nosuchpkg" in result.stderr


@pytest.fixture
def podman_state():
    # podman refuses a runroot path longer than 50 characters: keep it short.
    state = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
    yield ["--root", state / "root", "--runroot", state / "run", "--tmpdir", state / "tmp", "--storage-driver", "vfs"]
    shutil.rmtree(state, ignore_errors=True)


def test_podman_pull_and_run(shared_registry, podman_state):
    storage = podman_state
    image = f"{shared_registry.host}/shell/hello"
    run(tool("podman"), *storage, "pull", "--tls-verify=false", image)
    out = run(tool("podman"), *storage, "run", "--rm", "--runtime", "runc", "--network=none",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", image, "hello").stdout
    assert "Hello, world!" in out


@contextlib.contextmanager
def daemon(root: Path, name: str, command: list, ready: list, **run_kwargs):
    """Run a client daemon logging into `root` until `ready` succeeds; stop it afterwards."""
    log_path = root / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while run(*ready, check=False, **run_kwargs).returncode != 0:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory):
    root = tmp_path_factory.mktemp("docker")
    sock = root / "docker.sock"
    env = {"DOCKER_HOST": f"unix://{sock}"}
    command = [tool("dockerd"), "--data-root", root / "data", "--exec-root", root / "exec", "--pidfile", root / "pid",
               "-H", f"unix://{sock}", "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-masq=false",
               "--storage-driver=overlay2"]
    with daemon(root, "dockerd", command, [tool("docker"), "info"], env=env):
        yield env


def test_docker_pull_and_run(shared_registry, dockerd):
    image = f"{shared_registry.host}/shell/hello"
    run(tool("docker"), "pull", image, env=dockerd)
    out = run(tool("docker"), "run", "--rm", "--network", "none", image, "hello", env=dockerd).stdout
    assert "Hello, world!" in out
    # docker's default command is the image's Cmd: bash.
    out = run(tool("docker"), "run", "--rm", "--network", "none", image, "bash", "-c", "echo ok", env=dockerd).stdout
    assert out.strip() == "ok"


def test_docker_runs_a_single_package_image_by_its_main_program_and_nonroot_as_65532(shared_registry, dockerd):
    hello = f"{shared_registry.host}/hello"
    run(tool("docker"), "pull", hello, env=dockerd)
    assert run(tool("docker"), "run", "--rm", "--network", "none", hello, env=dockerd).stdout == "Hello, world!\n"
    nonroot = f"{shared_registry.host}/nonroot/shell/hello"
    run(tool("docker"), "pull", nonroot, env=dockerd)
    out = run(tool("docker"), "run", "--rm", "--network", "none", nonroot, "bash", "-c",
              "id -u; id -g; whoami; echo $HOME; touch $HOME/written && echo writable", env=dockerd).stdout
    assert out.split() == ["65532", "65532", "nonroot", "/home/nonroot", "writable"]
    # Without nonroot, root as in Nixery; the user has a name all the same.
    out = run(tool("docker"), "run", "--rm", "--network", "none", f"{shared_registry.host}/shell/hello", "whoami",
              env=dockerd).stdout
    assert out.strip() == "root"


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    """A containerd of its own (no CRI plugin), as Kubernetes nodes pull with it; yields ctr's arguments."""
    root = tmp_path_factory.mktemp("containerd")
    sock = root / "containerd.sock"
    config = root / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{root}/root"\nstate = "{root}/state"\n'
        f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{sock}"\n'
    )
    ctr = [tool("ctr"), "--address", str(sock), "--namespace", "tests"]
    with daemon(root, "containerd", [tool("containerd"), "--config", config], [*ctr, "version"]):
        yield ctr


def test_containerd_pulls_by_tag_and_by_digest_and_runs(shared_registry, containerd):
    # ctr HEADs the reference and takes the digest, size and media type from that answer.
    image = f"{shared_registry.host}/shell/hello"
    run(*containerd, "image", "pull", "--plain-http", f"{image}:latest")
    out = run(*containerd, "run", "--rm", f"{image}:latest", "hello-by-tag", "hello").stdout
    assert out == "Hello, world!\n"
    digest = shared_registry.head("/v2/shell/hello/manifests/latest").headers["Docker-Content-Digest"]
    run(*containerd, "image", "pull", "--plain-http", f"{image}@{digest}")
    listed = run(*containerd, "image", "list", "--quiet").stdout.split()
    assert f"{image}@{digest}" in listed
    out = run(*containerd, "run", "--rm", f"{image}@{digest}", "hello-by-digest", "hello").stdout
    assert out == "Hello, world!\n"


@pytest.fixture(scope="module")
def zstd_registry(tmp_path_factory):
    """A registry configured with LAYER_COMPRESSION=zstd (amd64 only, to keep it quick)."""
    process = RegistryProcess(tmp_path_factory.mktemp("zstd-registry"),
                              {"LAYER_COMPRESSION": "zstd", "PLATFORMS": "linux/amd64"}).start()
    yield process
    process.stop()


def test_zstd_images_pull_and_run_with_skopeo_podman_and_containerd(zstd_registry, tmp_path, podman_state,
                                                                     containerd):
    image = f"{zstd_registry.host}/shell/hello"
    skopeo_to_oci(zstd_registry, "shell/hello", tmp_path / "layout")
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    assert manifest["mediaType"] == OCI_MANIFEST
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    for layer in manifest["layers"]:  # the reference decompressor reads every layer as a tar
        run(tool("zstd"), "-t", blobs / layer["digest"].split(":")[1])
    # A client asking for Docker schema2 only still gets the OCI manifest: schema2 cannot say zstd.
    schema2 = zstd_registry.get("/v2/shell/hello/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    assert schema2.headers["Content-Type"] == OCI_MANIFEST

    run(tool("podman"), *podman_state, "pull", "--tls-verify=false", image)
    out = run(tool("podman"), *podman_state, "run", "--rm", "--runtime", "runc", "--network=none",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", image, "hello").stdout
    assert "Hello, world!" in out

    run(*containerd, "image", "pull", "--plain-http", f"{image}:latest")
    out = run(*containerd, "run", "--rm", f"{image}:latest", "hello-zstd", "hello").stdout
    assert out == "Hello, world!\n"


def test_crane_pull_and_digest(shared_registry, tmp_path):
    crane = clients.crane()
    # crane accepts indexes: the tag's digest is the index's, as a HEAD by the tag with crane's types says.
    digest = run(crane, "digest", "--insecure", f"{shared_registry.host}/hello:latest").stdout.strip()
    head = shared_registry.head("/v2/hello/manifests/latest", headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"})
    assert digest == head.headers["Docker-Content-Digest"]
    run(crane, "pull", "--insecure", "--format", "oci", f"{shared_registry.host}/hello:latest", tmp_path / "layout")
    run(crane, "validate", "--insecure", "--remote", f"{shared_registry.host}/hello:latest")
    # Without --platform crane keeps the whole index, with every platform's image.
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    pulled = index["manifests"][0]["digest"]
    assert pulled == digest
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    entries = json.loads((blobs / pulled.split(":")[1]).read_text())["manifests"]
    assert len(entries) == 2 and all((blobs / e["digest"].split(":")[1]).exists() for e in entries)


def test_oras_discovers_the_sbom_through_the_referrers_api_and_the_tag_schema_and_pulls_it(shared_registry, tmp_path):
    oras, image = clients.oras(), f"{shared_registry.host}/shell/hello:latest"
    found = {}
    for platform, name in (("linux/amd64", "shell/hello"), ("linux/arm64", "arm64/shell/hello")):
        # The platform's image manifest, as oras picks it from the index.
        digest = shared_registry.head(f"/v2/{name}/manifests/latest", headers={"Accept": OCI_MANIFEST}).headers[
            "Docker-Content-Digest"]
        for spec in ("v1.1-referrers-api", "v1.1-referrers-tag"):
            before = len(shared_registry.events("request"))
            tree = json.loads(run(oras, "discover", "--plain-http", "--platform", platform, "--distribution-spec", spec,
                                  "--format", "json", "--artifact-type", "application/vnd.cyclonedx+json", image).stdout)
            assert tree["digest"] == digest
            [referrer] = tree["referrers"]
            assert referrer["artifactType"] == "application/vnd.cyclonedx+json"
            found[platform, spec] = referrer["digest"]
            paths = [e["path"] for e in shared_registry.events("request")[before:]]
            asked = "/referrers/" if spec == "v1.1-referrers-api" else f"/manifests/{digest.replace(':', '-')}"
            assert any(asked in path for path in paths), paths
        assert found[platform, "v1.1-referrers-api"] == found[platform, "v1.1-referrers-tag"]
    assert found["linux/amd64", "v1.1-referrers-api"] != found["linux/arm64", "v1.1-referrers-api"]
    run(oras, "pull", "--plain-http", "-o", tmp_path / "out",
        f"{shared_registry.host}/shell/hello@{found['linux/amd64', 'v1.1-referrers-api']}")
    document = json.loads((tmp_path / "out" / "sbom.cdx.json").read_text())
    assert document["bomFormat"] == "CycloneDX"
    assert any(c["name"] == "hello" and c["version"] == "2.12.1" for c in document["components"])


def test_oci_conformance_suite_pull(shared_registry, tmp_path):
    name = "shell/hello"
    head = shared_registry.head(f"/v2/{name}/manifests/latest", headers={"Accept": OCI_MANIFEST})
    manifest = shared_registry.get(f"/v2/{name}/manifests/{head.headers['Docker-Content-Digest']}",
                                   headers={"Accept": OCI_MANIFEST}).json()
    env = clients.conformance_env(shared_registry.url, name, "latest", head.headers["Docker-Content-Digest"],
                                  manifest["layers"][0]["digest"], tmp_path)
    result = run(clients.conformance_test(), *clients.CONFORMANCE_FLAGS, f"-ginkgo.json-report={tmp_path / 'report.json'}",
                 env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "| 0 Failed |" in result.stdout and "0 Passed" not in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    passed = {spec["LeafNodeText"] for suite in report for spec in suite["SpecReports"] if spec["State"] == "passed"}
    assert "GET request to nonexistent blob should result in empty 200 response" in passed  # referrers
    assert "GET request to list tags should yield 200 response" in passed


# -- one name, every platform: clients choose from the image index ------------------------------


def platform_entry(registry, image: str, architecture: str, media_type: str = OCI_INDEX) -> dict:
    index = registry.get(f"/v2/{image}/manifests/latest", headers={"Accept": media_type}).json()
    [entry] = [m for m in index["manifests"] if m["platform"]["architecture"] == architecture]
    return entry


def demo_system_file(system: str) -> str:
    """The demo busybox's record of the system it was built for, as a path inside an image."""
    expression = f'(import {REPO_ROOT / "nix" / "demo"} {{ system = "{system}"; }}).busybox.outPath'
    busybox = json.loads(run("nix-instantiate", "--eval", "--json", "-E", expression).stdout)
    return f"{busybox}/share/busybox/system"


def test_crane_manifest_shows_the_index(shared_registry):
    shown = json.loads(run(clients.crane(), "manifest", "--insecure", f"{shared_registry.host}/hello:latest").stdout)
    assert shown["mediaType"] == OCI_INDEX
    assert [m["platform"] for m in shown["manifests"]] == [{"architecture": "amd64", "os": "linux"},
                                                          {"architecture": "arm64", "os": "linux"}]


def test_skopeo_override_arch_copies_the_arm64_image(shared_registry, tmp_path):
    layout = tmp_path / "layout"
    run(tool("skopeo"), "--override-arch", "arm64", "copy", "--src-tls-verify=false",
        f"docker://{shared_registry.host}/shell/hello:latest", f"oci:{layout}:latest")
    [copied] = json.loads((layout / "index.json").read_text())["manifests"]
    assert copied["digest"] == platform_entry(shared_registry, "shell/hello", "arm64")["digest"]
    run(tool("umoci"), "unpack", "--image", f"{layout}:latest", tmp_path / "bundle")
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / demo_system_file("aarch64-linux").lstrip("/")).read_text() == "aarch64-linux\n"
    assert not (rootfs / demo_system_file("x86_64-linux").lstrip("/")).exists()


def test_docker_pull_platform_arm64_takes_the_arm64_image(shared_registry, dockerd):
    image = f"{shared_registry.host}/goodbye"
    run(tool("docker"), "pull", "--platform", "linux/arm64", image, env=dockerd)
    inspect = json.loads(run(tool("docker"), "image", "inspect", image, env=dockerd).stdout)[0]
    assert inspect["Architecture"] == "arm64"
    index_digest = shared_registry.head("/v2/goodbye/manifests/latest",
                                        headers={"Accept": OCI_INDEX}).headers["Docker-Content-Digest"]
    assert inspect["RepoDigests"] == [f"{image}@{index_digest}"]
    # Its files are the aarch64-linux build (created, never run: this host cannot run arm64).
    container = run(tool("docker"), "create", "--platform", "linux/arm64", image, "true", env=dockerd).stdout.strip()
    try:
        archive = run(tool("docker"), "cp", f"{container}:{demo_system_file('aarch64-linux')}", "-",
                      env=dockerd, text=False).stdout
    finally:
        run(tool("docker"), "rm", container, env=dockerd)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert tar.extractfile(tar.getmembers()[0]).read() == b"aarch64-linux\n"


def test_default_docker_pull_takes_the_amd64_image_from_the_index(shared_registry, dockerd):
    image = f"{shared_registry.host}/tools"
    run(tool("docker"), "pull", image, env=dockerd)
    inspect = json.loads(run(tool("docker"), "image", "inspect", image, env=dockerd).stdout)[0]
    assert inspect["Architecture"] == "amd64"
    amd64 = shared_registry.head("/v2/tools/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    assert inspect["Id"] == json.loads(shared_registry.get(
        f"/v2/tools/manifests/{amd64.headers['Docker-Content-Digest']}").content)["config"]["digest"]


def test_podman_pull_arch_arm64_takes_the_arm64_image(shared_registry, podman_state):
    image = f"{shared_registry.host}/shell/goodbye"
    run(tool("podman"), *podman_state, "pull", "--tls-verify=false", "--arch", "arm64", image)
    [inspect] = json.loads(run(tool("podman"), *podman_state, "image", "inspect", image).stdout)
    assert inspect["Architecture"] == "arm64"
    entry = platform_entry(shared_registry, "shell/goodbye", "arm64")
    # podman names the image by the index's digest and by the arm64 manifest's.
    assert f"{image}@{entry['digest']}" in inspect["RepoDigests"]
    mounted = Path(run(tool("podman"), *podman_state, "image", "mount", image).stdout.strip())
    try:
        assert (mounted / demo_system_file("aarch64-linux").lstrip("/")).read_text() == "aarch64-linux\n"
    finally:
        run(tool("podman"), *podman_state, "image", "unmount", image)


def test_ctr_pull_platform_arm64_fetches_the_arm64_image(shared_registry, containerd, tmp_path):
    image = f"{shared_registry.host}/shell/hello:latest"
    run(*containerd, "image", "pull", "--plain-http", "--platform", "linux/arm64", image)
    entry = platform_entry(shared_registry, "shell/hello", "arm64")
    manifest = json.loads(run(*containerd, "content", "get", entry["digest"], text=False).stdout)
    config = json.loads(run(*containerd, "content", "get", manifest["config"]["digest"], text=False).stdout)
    assert config["architecture"] == "arm64"
    wanted = demo_system_file("aarch64-linux").lstrip("/")
    found = False
    for layer in manifest["layers"]:
        blob = run(*containerd, "content", "get", layer["digest"], text=False).stdout
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
            for member in tar:
                if member.name.lstrip("./") == wanted:
                    found = tar.extractfile(member).read() == b"aarch64-linux\n"
    assert found
