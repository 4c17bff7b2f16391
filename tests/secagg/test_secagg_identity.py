"""Signing identities and rosters: what a site accepts as a fellow member."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedseal.common.secagg import ConfigError, Identity, Roster, generate_identity
from fedseal.common.secagg.identity import load_public_blob, verify_signature


def _line(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def test_roster_accepts_concatenated_pub_files_with_comments_and_blank_lines() -> None:
    keys = [
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
        ec.generate_private_key(ec.SECP256R1()),
    ]
    text = "# the federation\n\n" + "\n".join(f"{_line(k)} site-{i}" for i, k in enumerate(keys))
    roster = Roster.from_text(text + "\n")
    assert len(roster) == 3
    for i, key in enumerate(keys):
        ident = Identity(key)
        assert ident.fingerprint in roster and roster.name(ident.fingerprint) == f"site-{i}"
        assert roster.blob(ident.fingerprint) == ident.blob
        assert roster.verify(ident.fingerprint, b"view", b"x", ident.sign(b"view", b"x"))
        assert not roster.verify(ident.fingerprint, b"views", b"x", ident.sign(b"view", b"x"))
    assert not roster.verify(bytes(32), b"view", b"x", b"sig")


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("ecdsa-sha2-nistp384\n", "line 1 is not"),
        ("ecdsa-sha2-nistp384 not*base64\n", "line 1: the key is not valid base64"),
        ("ssh-ed25519 AAAA\n", "line 1"),
    ],
)
def test_a_broken_roster_says_which_line(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Roster.from_text(text)


def test_rsa_keys_are_not_accepted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="ECDSA .* or Ed25519"):
        Roster.from_text(_line(key) + " old-site\n")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match="ECDSA .* or Ed25519"):
        Identity.from_private_bytes(pem)


def test_private_keys_load_from_openssh_or_pem_and_not_from_junk() -> None:
    private, public = generate_identity("a")
    assert Identity.from_private_bytes(private).fingerprint in Roster.from_text(public)
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert Identity.from_private_bytes(pem).fingerprint == Identity(key).fingerprint
    with pytest.raises(ConfigError, match="not an unencrypted OpenSSH or PEM private key"):
        Identity.from_private_bytes(public.encode())  # the .pub file by mistake
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(ConfigError, match="unencrypted"):
        Identity.from_private_bytes(encrypted)


def test_public_blobs_must_be_canonical_and_supported() -> None:
    ident = Identity(ed25519.Ed25519PrivateKey.generate())
    assert verify_signature(load_public_blob(ident.blob), b"advert", b"b", ident.sign(b"advert", b"b"))
    for bad in (b"", b"\x00\x00\x00\x0b", ident.blob + b"\x00", b"\xff" * 40, "text"):
        with pytest.raises(ConfigError):
            load_public_blob(bad)  # type: ignore[arg-type]
    assert not verify_signature(load_public_blob(ident.blob), b"advert", b"b", b"")
    assert not verify_signature(load_public_blob(ident.blob), b"advert", b"b", b"\x00" * 500)
    assert base64.b64decode(_line(ed25519.Ed25519PrivateKey.generate()).split()[1])
