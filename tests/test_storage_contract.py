"""What the build relies on from every storage backend, run over each one (filesystem, GCS emulator)."""
from __future__ import annotations

import hashlib

import pytest

from builder.cache import LayerRecord
from builder.storage.filesystem import FilesystemStorage
from builder.storage.gcs import GcsStorage


@pytest.fixture(params=["filesystem", "gcs"])
def storage(request, tmp_path):
    if request.param == "filesystem":
        backend = FilesystemStorage(str(tmp_path / "storage"))
    else:
        emulator = request.getfixturevalue("gcs_emulator")
        bucket = request.getfixturevalue("gcs_bucket")
        backend = GcsStorage(emulator.client().bucket(bucket.name), endpoint=emulator.url, public=True)
    backend.check()
    return backend


def name_of(layer_key: str) -> str:
    return hashlib.sha256(layer_key.encode()).hexdigest()


def test_layer_index_records_round_trip_and_are_replaced(storage):
    record = LayerRecord("abc:gzip-blocks-v1", "sha256:" + "1" * 64, "sha256:" + "2" * 64, 1234, "3" * 32)
    name = name_of(record.key)
    assert storage.read_layer_index(name) is None
    storage.put_layer_index(name, record.to_json())
    assert LayerRecord.from_json(storage.read_layer_index(name)) == record
    repacked = LayerRecord(record.key, "sha256:" + "4" * 64, record.diff_id, 99, "5" * 32)
    storage.put_layer_index(name, repacked.to_json())
    assert LayerRecord.from_json(storage.read_layer_index(name)) == repacked
    assert storage.read_layer_index(name_of("another key")) is None


@pytest.mark.parametrize("name", ["../blobs/sha256/" + "0" * 64, "0" * 63, "G" * 64, ""])
def test_layer_index_names_are_hashes_only(storage, name):
    with pytest.raises(ValueError):
        storage.put_layer_index(name, b"{}")
    with pytest.raises(ValueError):
        storage.read_layer_index(name)


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b'{"key": "k"}',
                                  b'{"key": 1, "digest": "d", "diff_id": "i", "size": 1, "md5": "m"}',
                                  b'{"key": "k", "digest": "d", "diff_id": "i", "size": "1", "md5": "m"}'])
def test_a_damaged_layer_index_record_reads_as_none(data):
    assert LayerRecord.from_json(data) is None
