"""Binary cache metadata: `<hash>.narinfo` files, their ed25519 signatures, and Nix's base-32.

A narinfo names a store path's compressed NAR (URL, Compression, FileHash, FileSize) and the NAR
itself (NarHash, NarSize); `Sig` lines sign the fingerprint `1;<path>;<NarHash>;<NarSize>;<refs>`.
FileHash and FileSize are not signed: trust comes from checking NarHash and NarSize.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"  # no e, o, u, t: Nix's base-32 alphabet
_HASH_PART = f"[{NIX32}]{{32}}"
STORE_PATH = re.compile(rf"^(/[^/\0]+)+/({_HASH_PART})-[A-Za-z0-9+\-._?=]+$")
MAX_NARINFO_BYTES = 64 << 10


class NarInfoError(Exception):
    """A narinfo that cannot be used: malformed, or not signed by a trusted key."""


def nix32_encode(data: bytes) -> str:
    """Nix's base-32 (as in store paths and `sha256:...` hashes): least significant bits last."""
    length = (len(data) * 8 + 4) // 5
    chars = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        chars.append(NIX32[c & 0x1F])
    return "".join(chars)


def nix32_decode(text: str, size: int) -> bytes:
    if len(text) != (size * 8 + 4) // 5:
        raise ValueError(f"a {size}-byte hash has {(size * 8 + 4) // 5} base-32 digits, not {len(text)}")
    out = bytearray(size)
    for n, char in enumerate(reversed(text)):
        digit = NIX32.find(char)
        if digit < 0:
            raise ValueError(f"{char!r} is not a base-32 digit")
        bit = n * 5
        i, j = divmod(bit, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < size:
            out[i + 1] |= carry
        elif carry:
            raise ValueError("base-32 hash out of range")
    return bytes(out)


def parse_sha256(text: str) -> bytes:
    """A SHA-256 as narinfos write it: `sha256:<base-32 or hex>` or SRI `sha256-<base64>`."""
    if text.startswith("sha256-"):
        raw = base64.b64decode(text[7:], validate=True)
    elif text.startswith("sha256:"):
        value = text[7:]
        raw = bytes.fromhex(value) if len(value) == 64 else nix32_decode(value, 32)
    else:
        raise ValueError(f"{text[:80]!r} is not a sha256 hash")
    if len(raw) != 32:
        raise ValueError(f"{text[:80]!r} is not a sha256 hash")
    return raw


def hash_part(store_path: str) -> str:
    match = STORE_PATH.match(store_path)
    if not match:
        raise ValueError(f"{store_path!r} is not a store path (/nix/store/<32 base-32 characters>-<name>)")
    return match.group(2)


@dataclass(frozen=True)
class NarInfo:
    store_path: str
    url: str
    compression: str
    nar_hash: bytes  # sha256 of the uncompressed NAR
    nar_size: int
    file_hash: bytes | None  # sha256 of the file at `url` (unsigned)
    file_size: int | None
    references: tuple[str, ...]  # base names, as the narinfo lists them
    signatures: tuple[str, ...]

    def fingerprint(self) -> bytes:
        store_dir = self.store_path.rsplit("/", 1)[0]
        references = ",".join(f"{store_dir}/{name}" for name in self.references)
        return f"1;{self.store_path};sha256:{nix32_encode(self.nar_hash)};{self.nar_size};{references}".encode()

    def check_signature(self, trusted_keys: str) -> str:
        """The name of a trusted key that signed this path; NarInfoError when none did.

        `trusted_keys`: space-separated `name:base64` ed25519 public keys (NIX_TRUSTED_PUBLIC_KEYS).
        """
        keys = parse_public_keys(trusted_keys)
        if not self.signatures:
            raise NarInfoError(f"the narinfo of {self.store_path} is not signed")
        fingerprint = self.fingerprint()
        signers = []
        for signature in self.signatures:
            name, _, value = signature.partition(":")
            signers.append(name)
            if name not in keys:
                continue
            try:
                keys[name].verify(base64.b64decode(value, validate=True), fingerprint)
                return name
            except (InvalidSignature, binascii.Error, ValueError):
                continue
        trusted = ", ".join(sorted(keys)) or "none"
        raise NarInfoError(
            f"the narinfo of {self.store_path} has no valid signature by a trusted key "
            f"(signed by: {', '.join(signers)}; trusted: {trusted})"
        )


def parse_public_keys(text: str) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for item in text.split():
        name, _, value = item.partition(":")
        try:
            keys[name] = Ed25519PublicKey.from_public_bytes(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise NarInfoError(f"{item!r} is not a public key (name:base64 of 32 bytes)") from None
    return keys


def parse(text: str) -> NarInfo:
    fields: dict[str, str] = {}
    signatures = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            raise NarInfoError(f"malformed narinfo line {line[:80]!r}")
        if key == "Sig":
            signatures.append(value.strip())
        else:
            fields[key] = value.strip()
    try:
        store_path = fields["StorePath"]
        hash_part(store_path)
        file_hash = fields.get("FileHash")
        file_size = fields.get("FileSize")
        return NarInfo(
            store_path=store_path,
            url=fields["URL"],
            # Nix's default for narinfos without the field.
            compression=fields.get("Compression", "bzip2"),
            nar_hash=parse_sha256(fields["NarHash"]),
            nar_size=int(fields["NarSize"]),
            file_hash=parse_sha256(file_hash) if file_hash else None,
            file_size=int(file_size) if file_size else None,
            references=tuple(fields.get("References", "").split()),
            signatures=tuple(signatures),
        )
    except KeyError as e:
        raise NarInfoError(f"the narinfo lacks {e.args[0]}") from None
    except ValueError as e:
        raise NarInfoError(f"malformed narinfo: {e}") from None
