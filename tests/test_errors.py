"""Registry errors: one class per spec code, and failures remembered by that code."""
from __future__ import annotations

import inspect
import json

import pytest

from builder import errors

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast


def test_each_code_has_one_class_in_the_code_table_and_refinements_keep_a_known_code():
    defined = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, errors.RegistryError) and cls is not errors.RegistryError}
    codes = [cls.code for cls in defined if cls.__bases__ == (errors.RegistryError,)]
    assert len(codes) == len(set(codes)) == len(errors.BY_CODE)
    assert set(errors.BY_CODE.values()) == {cls for cls in defined if cls.__bases__ == (errors.RegistryError,)}
    assert all(code == cls.code for code, cls in errors.BY_CODE.items())
    # A refinement (StorageFull: a 507 ServerError) is remembered and read back as its code's class.
    assert {cls.code for cls in defined} == set(errors.BY_CODE)


@pytest.mark.parametrize("cls", sorted(errors.BY_CODE.values(), key=lambda c: c.code))
def test_a_remembered_error_comes_back_with_its_status_code_message_and_detail(cls):
    remembered = json.loads(json.dumps(cls("why", {"unknown": ["nope"]}).remembered()))  # as a cache stores it
    assert remembered["code"] == cls.code
    again = errors.RegistryError.from_remembered(remembered)
    assert (type(again), again.status, again.message, again.detail) == (cls, cls.status, "why", {"unknown": ["nope"]})
    assert json.loads(again.body()) == {"errors": [{"code": cls.code, "message": "why", "detail": {"unknown": ["nope"]}}]}


def test_a_remembered_error_without_a_known_code_is_manifest_unknown():
    again = errors.RegistryError.from_remembered({"class": "ManifestUnknown", "message": "no package named 'x'"})
    assert type(again) is errors.ManifestUnknown and again.status == 404 and again.message == "no package named 'x'"
