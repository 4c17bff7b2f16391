"""`fedseal keys`: a CA and a server certificate with the right names on the server; each site
makes its own key Flower reads, and only its public key is admitted."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedseal.server.keys import KeysError, add_site, create_site_key, init_keys, parse_hosts
from fedseal.server.keys_cli import main


def _init(out: Path, *extra: str) -> int:
    return main(["init", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    out = root / "keys"
    assert _init(out, "--server-host", "fl.example.org,localhost,10.0.0.5") == 0
    for site in ("a", "b-2", "site_c"):  # each site at its own place; only .pub travels
        assert main(["site", "--name", site, "--out", str(root / f"at-{site}")]) == 0
        assert (
            main(
                [
                    "add-site",
                    "--out",
                    str(out),
                    "--name",
                    site,
                    "--pub",
                    str(root / f"at-{site}" / f"{site}.pub"),
                ]
            )
            == 0
        )
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_exist_and_private_keys_are_0600(fed):
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "supernodes.csv"):
        assert (fed / name).is_file(), name
    for site in ("a", "b-2", "site_c"):
        assert not (fed / "sites" / f"{site}.key").exists()  # the operator never holds it
        assert (fed / "sites" / f"{site}.pub").is_file()
        assert _mode(fed.parent / f"at-{site}" / f"{site}.key") == 0o600
    assert _mode(fed / "ca.key") == 0o600 and _mode(fed / "server.key") == 0o600
    assert _mode(fed / "ca.pem") == 0o644
    assert not list(fed.rglob("*.tmp")), "temporary files left behind"


def test_server_cert_verifies_against_the_ca_and_has_the_sans(fed):
    ca = x509.load_pem_x509_certificate((fed / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((fed / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    # Loopback addresses are always added: the SuperLink's own SuperExec connects to them.
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 364 <= days <= 366
    key = serialization.load_pem_private_key((fed / "server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_site_keys_load_the_way_flower_loads_them(fed):
    # flower-supernode: load_ssh_private_key; flwr supernode register: load_ssh_public_key.
    private = serialization.load_ssh_private_key((fed.parent / "at-a" / "a.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((fed / "sites" / "a.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == public
    rows = (fed / "supernodes.csv").read_text().splitlines()
    assert rows[0] == "site,public_key"
    assert [r.split(",")[0] for r in rows[1:]] == ["a", "b-2", "site_c"]
    assert rows[1].split(",")[1] == " ".join((fed / "sites" / "a.pub").read_text().split()[:2])


def test_rerun_refuses_and_overwrites_nothing(fed, capsys):
    before = {p: p.read_bytes() for p in fed.rglob("*") if p.is_file()}
    assert _init(fed, "--server-host", "fl.example.org,localhost,10.0.0.5") == 2
    assert "nothing to create" in capsys.readouterr().err
    with pytest.raises(KeysError, match=r"server\.pem covers .* --server-host asks for"):
        init_keys(fed, parse_hosts(["other.example.org"]))
    with pytest.raises(KeysError, match="already exists"):
        create_site_key(fed.parent / "at-a", "a")
    other = create_site_key(fed.parent / "elsewhere", "a")[1]
    with pytest.raises(KeysError, match="different key for site 'a'"):
        add_site(fed, "a", other)
    assert {p: p.read_bytes() for p in fed.rglob("*") if p.is_file()} == before


def test_add_site_takes_only_a_public_ecdsa_key(fed, tmp_path):
    key, pub = create_site_key(tmp_path, "d")
    with pytest.raises(KeysError, match="PRIVATE key"):
        add_site(fed, "d", key)
    (tmp_path / "junk.pub").write_text("ssh-ed25519 not-a-key\n")
    with pytest.raises(KeysError, match="not an OpenSSH public key"):
        add_site(fed, "d", tmp_path / "junk.pub")
    assert not (fed / "sites" / "d.pub").exists()


def test_force_replaces_keys(tmp_path):
    out = tmp_path / "keys"
    init_keys(out, parse_hosts(["localhost"]))
    old = (out / "ca.key").read_bytes()
    init_keys(out, parse_hosts(["127.0.0.1"]), force=True)
    assert (out / "ca.key").read_bytes() != old
    assert _mode(out / "ca.key") == 0o600
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()))


@pytest.mark.parametrize("name", ["a b", "../x", "a.b", "", "é", "x" * 65])
def test_bad_site_name_rejected(tmp_path, name, capsys):
    assert main(["site", "--name", name, "--out", str(tmp_path / "k")]) == 2
    assert "invalid site name" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_bad_host_rejected():
    with pytest.raises(KeysError, match="neither an IP address nor a valid host name"):
        parse_hosts(["https://fl.example.org:9093"])


def test_first_init_needs_server_host(tmp_path):
    with pytest.raises(KeysError, match="--server-host is required"):
        init_keys(tmp_path / "k", None)
