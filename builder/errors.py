"""Registry errors: one small class per error code of the distribution spec.

Every failure a client can see is raised as one of these and rendered to JSON
in one place (`http.py`), so the status, code and message always agree with the
spec and clients (skopeo, podman, docker) show the message to the user.
"""
from __future__ import annotations

import json
from typing import Any, Callable


class RegistryError(Exception):
    status: int = 500
    code: str = "UNKNOWN"
    default_message: str = "unknown error"
    headers: dict[str, str] = {}  # extra response headers (Retry-After)

    def __init__(self, message: str | None = None, detail: Any = None):
        self.message = message or self.default_message
        self.detail = detail
        super().__init__(self.message)

    def body(self, clean: Callable[[Any], Any] = lambda value: value) -> bytes:
        """The spec's JSON error body; `clean` filters message and detail (see `redact.py`)."""
        error: dict[str, Any] = {"code": self.code, "message": clean(self.message)}
        error["detail"] = clean(self.detail) if self.detail is not None else {}
        return json.dumps({"errors": [error]}).encode()

    def remembered(self) -> dict[str, Any]:
        """The error as the cache keeps it (a failed build, briefly): its spec code, not a class name."""
        return {"code": self.code, "message": self.message, "detail": self.detail}

    @staticmethod
    def from_remembered(error: dict[str, Any]) -> "RegistryError":
        """The error a `remembered()` dict stands for; MANIFEST_UNKNOWN when its code is not known."""
        cls = BY_CODE.get(error.get("code", ""), ManifestUnknown)
        return cls(error.get("message"), error.get("detail"))


# The spec's error codes, a line each: the class raised for the code, its status and default message.
class NameInvalid(RegistryError): status, code, default_message = 400, "NAME_INVALID", "invalid repository name"
class NameUnknown(RegistryError): status, code, default_message = 404, "NAME_UNKNOWN", "repository name not known to registry"
class ManifestUnknown(RegistryError): status, code, default_message = 404, "MANIFEST_UNKNOWN", "manifest unknown"
class BlobUnknown(RegistryError): status, code, default_message = 404, "BLOB_UNKNOWN", "blob unknown to registry"
class DigestInvalid(RegistryError): status, code, default_message = 400, "DIGEST_INVALID", "provided digest did not match uploaded content"
class PaginationNumberInvalid(RegistryError): status, code, default_message = 400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested"
class Denied(RegistryError): status, code, default_message = 403, "DENIED", "requested access to the resource is denied"
class Unsupported(RegistryError): status, code, default_message = 405, "UNSUPPORTED", "the operation is unsupported"
class Unavailable(RegistryError): status, code, default_message = 503, "UNAVAILABLE", "service unavailable"
# Not a spec code; the spec only demands 416 for an unsatisfiable range.
class RangeInvalid(RegistryError): status, code, default_message = 416, "RANGE_INVALID", "requested range not satisfiable"
# The registry's own fault: storage unreachable, Nix missing, a bug.
class ServerError(RegistryError): status, code, default_message = 500, "UNKNOWN", "internal server error"


class TooManyRequests(RegistryError):
    status, code, default_message = 429, "TOOMANYREQUESTS", "too many requests"

    def __init__(self, message: str | None = None, detail: Any = None, retry_after: int = 60):
        super().__init__(message, detail)
        self.headers = {"Retry-After": str(max(1, int(retry_after)))}


class StorageFull(ServerError):
    """The blob storage has no room left: heals by itself when space returns (nothing is remembered)."""

    status, default_message = 507, "the registry's storage is full"


# The spec's code -> its class, for failures remembered by code (as distribution's errcode keeps them).
BY_CODE: dict[str, type[RegistryError]] = {cls.code: cls for cls in RegistryError.__subclasses__()}
