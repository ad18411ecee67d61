"""The SBOM's and labels' pure parts: store path names, NAR hashes, license expressions."""
from __future__ import annotations

import base64
import hashlib

import pytest

from builder import contents, sbom

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast

STORE = "/nix/store/" + "a" * 32 + "-"


@pytest.mark.parametrize("name, expected", [
    ("hello-2.12.1", ("hello", "2.12.1")),
    ("bash-interactive-5.2", ("bash-interactive", "5.2")),
    ("iana-etc-20231227", ("iana-etc", "20231227")),
    ("big-package", ("big-package", None)),
    ("python3.11-numpy-1.26.4", ("python3.11-numpy", "1.26.4")),
    ("glibc-2.39-52-bin", ("glibc", "2.39-52-bin")),
])
def test_store_path_names_split_like_parse_drv_name(name, expected):
    assert sbom.parse_name(STORE + name) == expected


def test_nar_hashes_in_every_spelling_nix_prints_become_hex():
    digest = hashlib.sha256(b"abc").digest()
    assert sbom.sha256_hex("sha256-" + base64.b64encode(digest).decode()) == digest.hex()  # Nix >= 2.4 (SRI)
    # Nix's base32 of sha256("abc"), as `nix-hash --to-base32` prints it.
    assert sbom.sha256_hex("sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s") == digest.hex()
    assert sbom.sha256_hex("sha256:" + digest.hex()) == digest.hex()
    assert sbom.sha256_hex("sha256:not-a-hash") is None and sbom.sha256_hex("sha256-%%%") is None


def test_license_expressions_from_nixpkgs_meta_license():
    gpl = {"spdxId": "GPL-3.0-or-later", "name": "GNU GPL v3+"}
    assert contents.license_expression([gpl]) == "GPL-3.0-or-later"
    assert contents.license_expression([gpl, {"spdxId": "MIT", "name": "MIT"}]) == "GPL-3.0-or-later AND MIT"
    assert contents.license_expression([{"spdxId": None, "name": "Unfree"}]) == "LicenseRef-Unfree"
    assert contents.license_expression([gpl, gpl]) == "GPL-3.0-or-later"
    assert contents.license_expression([]) is None and contents.license_expression([{"name": "!!"}]) is None


def test_created_is_the_commit_time_or_the_fixed_epoch():
    assert contents.created(1704164645) == "2024-01-02T03:04:05Z"
    assert contents.created(None) == contents.created(0) == "1970-01-01T00:00:01Z"
