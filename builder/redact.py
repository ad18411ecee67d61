"""What a client may read of a message: no host path, no credential.

Store paths stay; paths in the package set become relative (`./default.nix`); other absolute host
paths become `<path>`; URL passwords and signature or token parameters become `<redacted>`.
Applied once, where `http.py` renders errors.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&](?:X-Goog-Signature|X-Goog-Credential|X-Amz-Signature|X-Amz-Credential|Signature|sig|"
    r"token|access_token|private_token|key|password)=)[^&\s'\"]+",
    re.IGNORECASE,
)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?P<first>[A-Za-z0-9._+-]+)(?P<rest>(?:/[^\s'\"`<>|;:,)\]}]*)?)")


def without_credentials(text: str) -> str:
    """`text` with URL passwords and signature or token parameters replaced by `<redacted>`."""
    text = _URL_USERINFO.sub(lambda m: m["scheme"] + "<redacted>@", text)
    return _SECRET_PARAMETER.sub(lambda m: m["name"] + "<redacted>", text)


class Redactor:
    def __init__(self, package_sets: Iterable[str] = (), store_root: str | None = None,
                 host_root_entries: Iterable[str] | None = None):
        if host_root_entries is None:
            try:
                host_root_entries = os.listdir("/")
            except OSError:
                host_root_entries = ()
        self._roots = frozenset(host_root_entries)
        folders = set()
        for folder in package_sets:
            if folder:
                folders.update({os.path.abspath(folder), os.path.realpath(folder)})
        # Longest first, so a folder inside another is matched whole.
        self._package_sets = sorted((f.rstrip("/") for f in folders if f != "/"), key=len, reverse=True)
        store_root = (store_root or "").rstrip("/")
        self._store_prefix = store_root + "/nix/store/" if store_root else None

    @classmethod
    def from_config(cls, config: Any) -> "Redactor":
        return cls(package_sets=[config.pkgs_path] if config.pkgs_path else [], store_root=config.nix_store)

    def text(self, text: str) -> str:
        text = without_credentials(text)
        if self._store_prefix:
            text = text.replace(self._store_prefix, "/nix/store/")
        for folder in self._package_sets:
            text = re.sub(re.escape(folder) + r"(?=/|\b|$)", ".", text)
        return _ABSOLUTE_PATH.sub(self._path, text)

    def _path(self, match: re.Match) -> str:
        first, rest = match["first"], match["rest"]
        if first not in self._roots or (first == "nix" and rest.startswith("/store/")):
            return match[0]
        return "<path>"

    def value(self, value: Any) -> Any:
        """`text` applied to every string inside JSON-like data (an error's detail)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value
