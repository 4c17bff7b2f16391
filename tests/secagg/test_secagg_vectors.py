"""Known-answer vectors: every byte format secure aggregation signs, commits to, derives
keys from or stores. An accidental change of an encoding, a label or a key derivation
fails here (and would make sites of two versions unable to talk)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.common.secagg.client import state_digest
from fedseal.common.secagg.crypto import (
    _associated_data,
    agree,
    check_proof_of_possession,
    proof_of_possession,
    public_key_from_private,
)
from fedseal.common.secagg.identity import SIGNATURE_PREFIX, Identity, Roster, fingerprint_text, signed_bytes
from fedseal.common.secagg.messages import (
    NO_CIPHERTEXT,
    Advert,
    RoundContext,
    ShareEntry,
    ShareMessage,
    View,
    ciphertext_digest,
    pack_var_table,
    seed_commitment,
    share_commitment,
    unpack_var_table,
)
from fedseal.common.secagg.protocol import encode_share_payload

SK1, SK2 = bytes([1] * 32), bytes([2] * 32)
PK1 = bytes.fromhex("a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209")
PK2 = bytes.fromhex("ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d59")
CTX = RoundContext(2**64 - 2, 7, [3, 2**63 + 5, 17], 2, 2, public_key_from_private(bytes(range(32))))
P384_LINE = (
    "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBKelVXwjFl8EQgD23Jyo"
    "0oIMfD4TnTL8fhrBototIlW3T5aIcB4fVQBd1un11ZYsVoqTGql4CLIahfcZSFP5p7j7prXFJb9XItgyBraIjHSuU9Xb"
    "29idDvBUfpFyYcNtTg== kat"
)
P384_SIG = bytes.fromhex(
    "30650230406161c31276ae0f15f882674c7eccf29bfb5a23946bed7e11403edccebbbc2ae6a2cd30bbe0efe771dc"
    "2e2de8606ad1023100c04c67c075b253758fc79137a0095906eff66f3b9bfe7b4e7129a978a1fdd376ebb3c8b8"
    "8e299c8c8117ad51cef1b3d9"
)


def test_signature_context() -> None:
    assert SIGNATURE_PREFIX == b"fedseal-secagg-v2 sig\x00"
    assert signed_bytes(b"view", b"body") == b"fedseal-secagg-v2 sig\x00view\x00body"


def test_a_fixed_p384_signature_verifies_for_its_purpose_only() -> None:
    roster = Roster.from_text(P384_LINE)
    (fp,) = list(roster)
    assert fp.hex() == "13e93fd57618ea222abcdf9570d7241ecccc7ddc50aca6c7cb142f87bf2f33f0"
    # the same text as `ssh-keygen -l` prints for this key
    assert fingerprint_text(fp) == "SHA256:E+k/1XYY6iIqvN+VcNckHszMfdxQrKbHyxQvh78vM/A"
    assert roster.verify(fp, b"view", b"known answer", P384_SIG)
    assert not roster.verify(fp, b"advert", b"known answer", P384_SIG)
    assert not roster.verify(fp, b"view", b"known answer!", P384_SIG)
    # the key behind it signs so that the roster accepts it (ECDSA is randomised)
    ident = Identity(ec.derive_private_key(123456789, ec.SECP384R1()))
    assert ident.fingerprint == fp
    assert roster.verify(fp, b"view", b"known answer", ident.sign(b"view", b"known answer"))


def test_round_context_digest() -> None:
    assert CTX.digest.hex() == "e17434b90fe3c0c367652aeb345dce04efaeeaa8dad2b2095d83f973c5861696"


def test_key_agreement_and_proof_of_possession() -> None:
    assert public_key_from_private(SK1) == PK1 and public_key_from_private(SK2) == PK2
    seed = agree(SK1, PK2, run_id=5, round_id=6, node_a=9, node_b=3, purpose=b"mask")
    assert seed.hex() == "0fe8aa772016f60adfe532f1b7866bb6b3df27bf60a78a31612be9e60d68a58f"
    pop = proof_of_possession(SK1, CTX.challenge, ctx_digest=CTX.digest, node=3)
    assert pop.hex() == "e7b287e1a0d48b33103d3a3160cacccc678aacee91f35062cc9c1cd3af9f3d03"
    assert check_proof_of_possession(bytes(range(32)), PK1, pop, ctx_digest=CTX.digest, node=3)
    assert not check_proof_of_possession(bytes(range(32)), PK1, pop, ctx_digest=CTX.digest, node=4)


def test_share_encryption_associated_data_and_payload() -> None:
    assert _associated_data(1, 2, 3, 4) == b"FSSA" + b"".join(i.to_bytes(8, "big") for i in range(1, 5))
    assert encode_share_payload(1, 2, 3, bytes([4] * 32), bytes([5] * 32)) == (
        (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + (3).to_bytes(2, "big")
        + bytes([4] * 32)
        + bytes([5] * 32)
    )


def test_advert_encoding() -> None:
    advert = Advert(
        3,
        b"\x00\x00\x00\x0bssh-ed25519" + bytes(36),
        PK1,
        PK2,
        ((17, bytes(32)), (2**63 + 5, bytes([7] * 32))),
        bytes([9] * 32),
        b"sig",
    )
    encoded = advert.encode(CTX.digest)
    assert encoded.hex() == (
        "000000dae17434b90fe3c0c367652aeb345dce04efaeeaa8dad2b2095d83f973c586169600000000000000030047"
        "f103c5d95ffb3ba62adfa05254ffbb5ac3bfecc7272c05918e4b1b29abeba4e09292b651c278b9772c569f5fa9bb"
        "13d906b46ab68c9df9dc2b4409f8a209ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e58"
        "7d59000200000000000000110000000000000000000000000000000000000000000000000000000000000000800000"
        "0000000005070707070707070707070707070707070707070707070707070707070707070709090909090909090909"
        "0909090909090909090909090909090909090909090900330000000b7373682d65643235353139000000000000000000"
        "0000000000000000000000000000000000000000000000000000000003736967"
    )
    assert Advert.decode(encoded) == (advert, CTX.digest)


def test_share_message_encoding_and_commitments() -> None:
    message = ShareMessage(
        3,
        bytes([4] * 32),
        (
            ShareEntry(3, 1, bytes([5] * 32), bytes([6] * 32), NO_CIPHERTEXT),
            ShareEntry(17, 2, bytes([7] * 32), bytes([8] * 32), bytes([1] * 32)),
        ),
        b"s",
    )
    encoded = message.encode(CTX.digest)
    assert encoded == (
        (286).to_bytes(4, "big")
        + CTX.digest
        + (3).to_bytes(8, "big")
        + bytes([4] * 32)
        + (2).to_bytes(2, "big")
        + (3).to_bytes(8, "big")
        + (1).to_bytes(2, "big")
        + bytes([5] * 32)
        + bytes([6] * 32)
        + bytes(32)
        + (17).to_bytes(8, "big")
        + (2).to_bytes(2, "big")
        + bytes([7] * 32)
        + bytes([8] * 32)
        + bytes([1] * 32)
        + (1).to_bytes(2, "big")
        + b"s"
    )
    assert ShareMessage.decode(encoded) == (message, CTX.digest)
    assert (
        share_commitment(CTX, 3, 2, b"b", bytes([1] * 32)).hex()
        == "c18f4a05e93cac3ee1370296e8926a3764a5b3534e4b5d3613fead18361313b4"
    )
    assert (
        share_commitment(CTX, 3, 2, b"s", bytes([1] * 32)).hex()
        == "63a8d1e3048c696cb5bce8189a615483dc4acc6325aa4acba64a682f211247ac"
    )
    assert (
        seed_commitment(CTX, 3, bytes([1] * 32)).hex()
        == "e3a88618f4c73dfe8c4f0501b94ec61bc982d1beea821dd93ab41a739b50e111"
    )
    assert (
        ciphertext_digest(b"abc").hex() == "b12cdea6c9f141cab0e9304726fc8b9b90d34af678420c6cb66592c3be21f637"
    )


def test_view_encoding() -> None:
    view = View({17: bytes([1] * 32), 3: bytes([2] * 32)}, {2**63 + 5: bytes([3] * 32)})
    body = view.body(CTX.digest)
    assert (
        len(body) == 160
        and hashlib.sha256(body).hexdigest()
        == "d297e2b0ef4d54c64655cd0acf29a5b35c000af7868412fb5287240c18b88429"
    )
    assert View.decode(body) == (view, CTX.digest)


def test_tables_and_state_digest() -> None:
    assert (
        pack_var_table({5: b"ab", 1: b""}).hex()
        == "000000020000000000000001000000000000000000000005000000026162"
    )
    assert unpack_var_table(
        bytes.fromhex("000000020000000000000001000000000000000000000005000000026162")
    ) == {1: b"", 5: b"ab"}
    assert state_digest(b"{}").hex() == "acbce619f31612964a6e831685393e9f8e373e69ce1ea589e4868a7140cc03b3"


def test_keys_written_for_simulations_are_openssh_p384() -> None:
    from fedseal.common.secagg import generate_identity

    private, public = generate_identity("site-0")
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.endswith(" site-0")
    key = serialization.load_ssh_private_key(private, password=None)
    assert Identity.from_private_bytes(private).fingerprint in Roster.from_text(public)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
