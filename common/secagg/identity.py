"""Long-term signing identities of sites and the roster a site accepts.

A site signs what it says in secure aggregation with its own long-term key
(an OpenSSH private key made at the site; the server never holds it). Another
site accepts a signature only if the signing key is in its *roster*: the
OpenSSH public keys, one per line, of the sites it accepts as fellow members.
The roster is the PKI that stops a lying server from inventing sites (Sybils)
or substituting keys.

* Keys: ECDSA over NIST P-256, P-384 (what ``fedseal keys`` makes) or P-521,
  with SHA-256, SHA-384 or SHA-512 respectively, and Ed25519.
* A key is named by its *fingerprint*: SHA-256 of its OpenSSH wire blob (the
  base64-decoded middle field of a ``.pub`` line), the same value
  ``ssh-keygen -l`` prints as ``SHA256:...``.
* Every signature is domain separated: the signed bytes are
  ``b"fedseal-secagg-v2 sig\\x00" || purpose || b"\\x00" || body`` (see
  :func:`signed_bytes`), so a signature made for one message type can never be
  replayed as another, nor as anything outside fedseal's secure aggregation.

Pure functions over ``bytes``/``str``: reading files is the caller's job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .errors import ConfigError

__all__ = [
    "SIGNATURE_PREFIX",
    "FINGERPRINT_BYTES",
    "MAX_SIGNATURE_BYTES",
    "Identity",
    "Roster",
    "fingerprint",
    "fingerprint_text",
    "generate_identity",
    "load_public_blob",
    "signed_bytes",
    "verify_signature",
]

SIGNATURE_PREFIX = b"fedseal-secagg-v2 sig\x00"
"""First bytes of everything a site signs in secure aggregation."""
FINGERPRINT_BYTES = 32
"""Length of a key fingerprint (SHA-256)."""
MAX_SIGNATURE_BYTES = 160
"""Upper bound on a signature's length (ECDSA P-521 DER is at most 139 bytes)."""
MAX_BLOB_BYTES = 1024
"""Upper bound on an OpenSSH public key blob fedseal accepts."""

_EC_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def signed_bytes(purpose: bytes, body: bytes) -> bytes:
    """The exact bytes a signature covers: prefix, purpose, a NUL, then the body.

    Parameters
    ----------
    purpose : bytes
        Short ASCII label of the message type (no NUL byte), e.g. ``b"advert"``.
    body : bytes
        The message's canonical encoding.

    Returns
    -------
    bytes
        ``SIGNATURE_PREFIX || purpose || b"\\x00" || body``.
    """
    if not purpose or b"\x00" in purpose:
        raise ConfigError("a signature purpose must be a non-empty label without NUL bytes")
    return SIGNATURE_PREFIX + purpose + b"\x00" + bytes(body)


def fingerprint(blob: bytes) -> bytes:
    """SHA-256 of an OpenSSH public key blob (32 bytes)."""
    return hashlib.sha256(bytes(blob)).digest()


def fingerprint_text(fp: bytes) -> str:
    """``SHA256:<base64>`` as ``ssh-keygen -l`` prints it, for messages to operators."""
    return "SHA256:" + base64.b64encode(bytes(fp)).decode("ascii").rstrip("=")


def _check_supported(key: object, what: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC_HASHES:
            raise ConfigError(f"{what} uses curve {key.curve.name}; use P-256, P-384 or P-521")
        return
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return
    raise ConfigError(
        f"{what} is a {type(key).__name__}; secure aggregation signs with "
        "ECDSA (P-256/P-384/P-521) or Ed25519 keys only"
    )


def _blob_of(key: PublicKey) -> bytes:
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def load_public_blob(blob: bytes) -> PublicKey:
    """Parse an OpenSSH public key blob.

    Raises
    ------
    ConfigError
        If the blob is malformed or of an unsupported key type.
    """
    if not isinstance(blob, (bytes, bytearray)) or not 4 < len(blob) <= MAX_BLOB_BYTES:
        raise ConfigError("a signing key blob must be 5 to 1024 bytes")
    blob = bytes(blob)
    (name_len,) = struct.unpack_from(">I", blob)
    name = blob[4 : 4 + name_len]
    if len(name) != name_len or not name.isascii():
        raise ConfigError("a signing key blob does not start with a key type name")
    try:
        key = serialization.load_ssh_public_key(name + b" " + base64.b64encode(blob))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"a signing key blob is not a valid OpenSSH public key ({exc})") from None
    _check_supported(key, "a signing key")
    if _blob_of(key) != blob:  # type: ignore[arg-type]
        raise ConfigError("a signing key blob is not in canonical OpenSSH form")
    return key  # type: ignore[return-value]


def verify_signature(key: PublicKey, purpose: bytes, body: bytes, signature: object) -> bool:
    """Whether ``signature`` is ``key``'s signature of :func:`signed_bytes` ``(purpose, body)``."""
    if not isinstance(signature, (bytes, bytearray)) or not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        return False
    data = signed_bytes(purpose, body)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(bytes(signature), data, ec.ECDSA(_EC_HASHES[key.curve.name]()))
        else:
            key.verify(bytes(signature), data)
    except InvalidSignature:
        return False
    return True


class Identity:
    """A site's long-term private signing key.

    Parameters
    ----------
    private_key
        An ECDSA (P-256/P-384/P-521) or Ed25519 private key object.
    """

    def __init__(self, private_key: PrivateKey) -> None:
        _check_supported(private_key, "this site's signing key")
        self._key = private_key
        self.public_key: PublicKey = private_key.public_key()
        self.blob: bytes = _blob_of(self.public_key)
        self.fingerprint: bytes = fingerprint(self.blob)

    @classmethod
    def from_private_bytes(cls, data: bytes) -> Identity:
        """Load an unencrypted OpenSSH (or PEM) private key.

        Raises
        ------
        ConfigError
            If the key cannot be read, is encrypted, or is of an unsupported type.
        """
        loaders = (serialization.load_ssh_private_key, serialization.load_pem_private_key)
        errors = []
        for loader in loaders:
            try:
                key = loader(bytes(data), password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                errors.append(str(exc))
                continue
            return cls(key)  # type: ignore[arg-type]
        raise ConfigError(
            "this site's signing key is not an unencrypted OpenSSH or PEM private "
            f"key ({errors[0]}); give the .key file `fedseal keys` wrote"
        )

    def sign(self, purpose: bytes, body: bytes) -> bytes:
        """Sign :func:`signed_bytes` ``(purpose, body)``."""
        data = signed_bytes(purpose, body)
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(data, ec.ECDSA(_EC_HASHES[self._key.curve.name]()))
        return self._key.sign(data)


def generate_identity(comment: str = "") -> tuple[bytes, str]:
    """A fresh P-384 signing key: ``(OpenSSH private key bytes, OpenSSH public key line)``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )
    return private, f"{line} {comment}".rstrip()


@dataclass(frozen=True)
class _Member:
    key: PublicKey
    blob: bytes
    name: str


class Roster:
    """The sites a site accepts as fellow members, keyed by fingerprint.

    Build it with :meth:`from_text` from the concatenation of the sites' ``.pub``
    files (``ecdsa-sha2-nistp384 AAAA... name``; blank lines and ``#`` comments
    are skipped).
    """

    def __init__(self, members: dict[bytes, _Member]) -> None:
        self._members = dict(members)

    @classmethod
    def from_text(cls, text: str) -> Roster:
        """Parse a roster file's text.

        Raises
        ------
        ConfigError
            On a line that is not a supported OpenSSH public key (naming the line),
            or an empty roster.
        """
        members: dict[bytes, _Member] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) < 2:
                raise ConfigError(f"roster line {number} is not 'TYPE BASE64 [NAME]'")
            try:
                blob = base64.b64decode(fields[1], validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"roster line {number}: the key is not valid base64") from None
            try:
                key = load_public_blob(blob)
            except ConfigError as exc:
                raise ConfigError(f"roster line {number}: {exc}") from None
            members[fingerprint(blob)] = _Member(key, blob, " ".join(fields[2:]) or f"line {number}")
        if not members:
            raise ConfigError("the roster of accepted sites is empty; list the sites' .pub lines")
        return cls(members)

    def __contains__(self, fp: object) -> bool:
        return fp in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._members)

    def name(self, fp: bytes) -> str:
        """The comment (site name) of the roster line with fingerprint ``fp``."""
        member = self._members.get(fp)
        return member.name if member else fingerprint_text(fp)

    def blob(self, fp: bytes) -> bytes:
        """The OpenSSH blob of the member with fingerprint ``fp`` (KeyError if none)."""
        return self._members[fp].blob

    def verify(self, fp: bytes, purpose: bytes, body: bytes, signature: bytes) -> bool:
        """Whether the member with fingerprint ``fp`` signed ``(purpose, body)``.

        False when ``fp`` is not in the roster.
        """
        member = self._members.get(bytes(fp)) if isinstance(fp, (bytes, bytearray)) else None
        return member is not None and verify_signature(member.key, purpose, body, signature)
