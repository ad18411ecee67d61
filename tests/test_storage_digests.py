"""The storage backends' one digest rule: blobs live under sha256 hex, and bytes must match it."""
from __future__ import annotations

import hashlib

import pytest

from builder.errors import ServerError
from builder.storage import check_digest_of, digest_hex
from builder.storage.filesystem import FilesystemStorage
from builder.storage.gcs import BLOB_PREFIX, blob_key

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast

DATA = b'{"schemaVersion": 2}'
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("digest", ["sha512:" + "a" * 64, "sha256:" + "A" * 64, "sha256:abc", "sha256:" + "g" * 64,
                                    "sha256:../" + "a" * 61])
def test_only_a_sha256_digest_names_a_blob(digest):
    with pytest.raises(ValueError, match="not a sha256 digest"):
        digest_hex(digest)


def test_both_backends_store_a_blob_under_its_hex(tmp_path):
    assert blob_key(DIGEST) == BLOB_PREFIX + DIGEST[7:]
    assert FilesystemStorage(str(tmp_path)).blob_path(DIGEST).name == DIGEST[7:]


def test_bytes_are_refused_under_a_digest_they_do_not_have(tmp_path):
    check_digest_of(DATA, DIGEST)
    storage = FilesystemStorage(str(tmp_path))
    storage.check()  # makes its folders, as at start-up
    with pytest.raises(ServerError, match="do not have"):
        storage.put_bytes(DIGEST, DATA + b" ", "application/json")
    storage.put_bytes(DIGEST, DATA, "application/json")
    assert storage.read_bytes(DIGEST) == DATA
