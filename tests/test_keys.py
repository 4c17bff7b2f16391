"""`fedseal keys init`: a CA, a server certificate with the right names, site keys Flower reads."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.keys import KeysError, init_keys, parse_hosts, parse_sites
from server.keys_cli import main


def _init(out: Path, *extra: str) -> int:
    return main(["init", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "keys"
    assert _init(out, "--server-host", "fl.example.org,localhost,10.0.0.5",
                 "--sites", "a,b-2,site_c") == 0
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_exist_and_private_keys_are_0600(fed):
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "supernodes.csv"):
        assert (fed / name).is_file(), name
    for site in ("a", "b-2", "site_c"):
        assert (fed / "sites" / f"{site}.key").is_file()
        assert (fed / "sites" / f"{site}.pub").is_file()
        assert _mode(fed / "sites" / f"{site}.key") == 0o600
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
        ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 364 <= days <= 366
    key = serialization.load_pem_private_key((fed / "server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_site_keys_load_the_way_flower_loads_them(fed):
    # flower-supernode: load_ssh_private_key; flwr supernode register: load_ssh_public_key.
    private = serialization.load_ssh_private_key((fed / "sites" / "a.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((fed / "sites" / "a.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == public
    rows = (fed / "supernodes.csv").read_text().splitlines()
    assert rows[0] == "site,public_key"
    assert [r.split(",")[0] for r in rows[1:]] == ["a", "b-2", "site_c"]
    assert rows[1].split(",")[1] == " ".join((fed / "sites" / "a.pub").read_text().split()[:2])


def test_rerun_refuses_and_overwrites_nothing(fed, capsys):
    before = {p: p.read_bytes() for p in fed.rglob("*") if p.is_file()}
    assert _init(fed, "--server-host", "fl.example.org,localhost,10.0.0.5",
                 "--sites", "a,b-2") == 2
    assert "nothing to create" in capsys.readouterr().err
    with pytest.raises(KeysError, match=r"server\.pem covers .* --server-host asks for"):
        init_keys(fed, ["new"], parse_hosts(["other.example.org"]))
    assert {p: p.read_bytes() for p in fed.rglob("*") if p.is_file()} == before


def test_adding_a_site_keeps_the_ca_and_server_key(tmp_path):
    out = tmp_path / "keys"
    init_keys(out, ["a"], parse_hosts(["localhost"]))
    kept = {n: (out / n).read_bytes() for n in ("ca.key", "ca.pem", "server.key", "server.pem")}
    site_a = (out / "sites" / "a.key").read_bytes()
    result = init_keys(out, ["a", "b"], None)  # --server-host not needed to add sites
    assert {n: (out / n).read_bytes() for n in kept} == kept
    assert (out / "sites" / "a.key").read_bytes() == site_a
    assert _mode(out / "sites" / "b.key") == 0o600
    assert result.sites == ["a", "b"]
    assert "b," in (out / "supernodes.csv").read_text()


def test_force_replaces_keys(tmp_path):
    out = tmp_path / "keys"
    init_keys(out, ["a"], parse_hosts(["localhost"]))
    old = (out / "ca.key").read_bytes(), (out / "sites" / "a.key").read_bytes()
    init_keys(out, ["a"], parse_hosts(["127.0.0.1"]), force=True)
    assert ((out / "ca.key").read_bytes(), (out / "sites" / "a.key").read_bytes()) != old
    assert _mode(out / "ca.key") == 0o600
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()))


@pytest.mark.parametrize("name", ["a b", "../x", "a.b", "", "é", "x" * 65])
def test_bad_site_name_rejected(tmp_path, name, capsys):
    with pytest.raises(KeysError, match="site name|no site named"):
        parse_sites([name])
    if name:
        assert _init(tmp_path / "k", "--server-host", "localhost", "--sites", f"ok,{name}") == 2
        assert "invalid site name" in capsys.readouterr().err
        assert not (tmp_path / "k").exists()


def test_duplicate_site_and_bad_host_rejected():
    with pytest.raises(KeysError, match="named twice"):
        parse_sites(["a,A"])
    with pytest.raises(KeysError, match="neither an IP address nor a valid host name"):
        parse_hosts(["https://fl.example.org:9093"])


def test_first_init_needs_server_host(tmp_path):
    with pytest.raises(KeysError, match="--server-host is required"):
        init_keys(tmp_path / "k", ["a"], None)
