"""Cost guards in the request path: per-client build admission (429) and commit tags (COMMIT_TAGS)."""
from __future__ import annotations

import pytest

from builder import admission, errors
from builder.config import Config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.fast
def test_a_client_gets_its_hours_share_of_builds_then_a_429_saying_when_to_retry():
    clock = Clock()
    gate = admission.BuildAdmission(per_hour=3, clock=clock)
    for _ in range(3):
        gate.admit("198.51.100.7")
        clock.now += 100
    with pytest.raises(errors.TooManyRequests) as refused:
        gate.admit("198.51.100.7")
    assert refused.value.status == 429 and refused.value.code == "TOOMANYREQUESTS"
    assert refused.value.headers == {"Retry-After": str(3600 - 300)}  # when the first build leaves the hour
    assert "BUILDS_PER_CLIENT_PER_HOUR" in refused.value.message
    gate.admit("203.0.113.9")  # another client is not affected
    clock.now += 3600 - 300
    gate.admit("198.51.100.7")  # the oldest left the window


@pytest.mark.fast
def test_zero_means_unbounded_and_the_client_is_the_last_forwarded_hop():
    gate = admission.BuildAdmission(per_hour=0)
    for _ in range(1000):
        gate.admit("198.51.100.7")
    # Earlier X-Forwarded-For entries come from the client itself and could be forged.
    assert admission.client_of("1.2.3.4, 198.51.100.7", "10.0.0.1") == "198.51.100.7"
    assert admission.client_of(None, "10.0.0.1") == "10.0.0.1"


@pytest.mark.fast
@pytest.mark.parametrize("value, allowed", [
    ("any", True), ("none", False), (COMMIT, True), ("f" * 40, False), (f"{'f' * 40} {COMMIT}", True),
])
def test_commit_tags_any_none_or_an_allow_list(value, allowed):
    assert Config.from_env({"COMMIT_TAGS": value}).commit_tag_allowed(COMMIT) is allowed


@pytest.mark.fast
@pytest.mark.parametrize("value", ["some", "any none", "any " + COMMIT, "abc"])
def test_a_malformed_commit_tags_setting_says_what_it_takes(value):
    with pytest.raises(errors.ServerError, match="COMMIT_TAGS must be any, none, or a list of 40-hex commits"):
        Config.from_env({"COMMIT_TAGS": value})


def test_over_its_share_a_client_gets_429_with_retry_after_while_cached_images_and_others_are_served(
    start_registry
):
    registry = start_registry({"BUILDS_PER_CLIENT_PER_HOUR": "1", "COMMIT_TAGS": "none"})
    assert registry.get("/v2/hello/manifests/latest").status_code == 200  # its one build

    refused = registry.get("/v2/goodbye/manifests/latest")
    assert refused.status_code == 429, refused.text
    assert 3500 <= int(refused.headers["Retry-After"]) <= 3600
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert "image builds in the last hour" in refused.json()["errors"][0]["message"]

    assert registry.get("/v2/hello/manifests/latest").status_code == 200  # cached: never refused
    other = registry.get("/v2/goodbye/manifests/latest", headers={"X-Forwarded-For": "203.0.113.9"})
    assert other.status_code == 200, other.text
    assert [b["image"] for b in registry.builds() if b["result"] == "built"] == ["hello", "goodbye"]

    # A commit tag is refused before anything is resolved or built.
    denied = registry.get(f"/v2/hello/manifests/{COMMIT}", headers={"X-Forwarded-For": "192.0.2.1"})
    assert denied.status_code == 403, denied.text
    assert denied.json()["errors"][0]["code"] == "DENIED" and "COMMIT_TAGS" in denied.json()["errors"][0]["message"]
    assert len(registry.builds()) == 2
