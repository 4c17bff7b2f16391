"""``fedseal keys``: the federation's certificates (on the server) and each site's key (at the site).

Sites make their own keys; only public keys travel. Three commands:

``fedseal keys site --name NAME --out DIR`` (at the site)
    ``DIR/NAME.key`` (0600, OpenSSH ECDSA P-384) and ``DIR/NAME.pub``. The
    private key never leaves the site: it authenticates the site's SuperNode
    and signs what the site says in secure aggregation. Send ``NAME.pub`` to
    the operator (and to the other sites, for their ``--peers`` roster).
``fedseal keys init --out DIR --server-host HOST,...`` (on the server)
    ``DIR/ca.pem`` (give it to every site), ``DIR/ca.key`` (0600, keep it
    offline), ``DIR/server.pem`` + ``DIR/server.key`` (the TLS certificate the
    reverse proxy and the SuperLink present);
``fedseal keys add-site --out DIR --name NAME --pub FILE`` (on the server)
    checks a site's public key and files it as ``DIR/sites/NAME.pub``;
    ``DIR/supernodes.csv`` lists every admitted site's name and key.
    ``fedseal server`` registers each of them with the SuperLink.

Nothing is overwritten silently: anything that would replace an existing key
or certificate is refused unless ``--force`` is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseal.common.durable import fsync_path
from fedseal.common.errors import FedsealError
from fedseal.common.secagg import generate_identity

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
SITES_DIR = "sites"
SUPERNODES_CSV = "supernodes.csv"

SITE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

CA_CURVE = ec.SECP384R1()
SERVER_CURVE = ec.SECP256R1()
CLOCK_SKEW = dt.timedelta(minutes=5)
LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


class KeysError(FedsealError, ValueError):
    """A key or certificate cannot be created as asked (bad name, existing file, ...)."""

    code = "keys.error"


@dataclass(frozen=True)
class Hosts:
    """The names and addresses a server certificate must cover."""

    dns: tuple[str, ...]
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]

    def general_names(self) -> list[x509.GeneralName]:
        """Subject alternative names, DNS names first."""
        return [x509.DNSName(n) for n in self.dns] + [x509.IPAddress(ip) for ip in self.ips]

    def as_set(self) -> set[str]:
        """Lower-cased names and canonical addresses, for comparing certificates."""
        return {n.lower() for n in self.dns} | {str(ip) for ip in self.ips}

    def first(self) -> str:
        """The name used as the certificate's common name."""
        return self.dns[0] if self.dns else str(self.ips[0])

    def with_loopback(self) -> Hosts:
        """These hosts plus ``127.0.0.1`` and ``::1``.

        The SuperLink starts its own SuperExec, which connects over TLS to the
        SuperLink's ``--host`` with a bind-all address replaced by the loopback
        one (``0.0.0.0`` becomes ``127.0.0.1``) and checks the certificate
        against that address; without it the SuperLink logs
        ``IP address mismatch, certificate is not valid for '127.0.0.1'`` and
        never runs a ServerApp.
        """
        extra = [ip for ip in LOOPBACK if ip not in self.ips]
        return Hosts(self.dns, self.ips + tuple(extra))


@dataclass
class KeysResult:
    """What :func:`init_keys` did, path by path."""

    out: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)  # every site with a key in out/sites


def validate_site_name(name: str) -> str:
    """Return ``name`` if it is a valid site name, else raise :class:`KeysError`."""
    if not SITE_NAME.match(name):
        raise KeysError(
            f"invalid site name {name!r}: use 1 to 64 letters, digits, '-' or '_' "
            "(it becomes a file name and the SuperNode's registered name)"
        )
    return name


def parse_hosts(values: list[str]) -> Hosts:
    """Split ``--server-host`` values into DNS names and IP addresses.

    Raises
    ------
    KeysError
        If a value is neither an IP address nor a valid host name.
    """
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for value in values:
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                continue
            try:
                ip = ipaddress.ip_address(item.strip("[]"))
            except ValueError:
                ip = None
            if ip is not None:
                if ip not in ips:
                    ips.append(ip)
                continue
            name = item.rstrip(".")
            labels = name.split(".")
            if labels and labels[0] == "*":  # a wildcard is only allowed as the first label
                labels = labels[1:]
            if len(name) > 253 or not labels or not all(_DNS_LABEL.match(p) for p in labels):
                raise KeysError(
                    f"--server-host {item!r} is neither an IP address nor a valid host name "
                    "(letters, digits and '-', dot-separated; no scheme or port)"
                )
            if name.lower() not in (n.lower() for n in dns):
                dns.append(name)
    if not dns and not ips:
        raise KeysError(
            "--server-host is empty: give the names and addresses sites use to "
            "reach the SuperLink, e.g. --server-host fl.example.org,10.0.0.5"
        )
    return Hosts(tuple(dns), tuple(ips))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file (mode 0600 for private keys, 0644 otherwise)
    in the same folder, are fsynced, then linked into place: with ``overwrite``
    by ``os.replace``, without it by ``os.link``, which fails rather than replace
    a file that appeared meanwhile.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeysError(
                    f"{path} already exists; it was not overwritten (add --force to replace it)"
                ) from None
            os.unlink(tmp)
        fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def site_key_files(name: str) -> tuple[bytes, bytes]:
    """A new SuperNode key pair for site ``name``: (OpenSSH private key, OpenSSH public key line).

    ``flower-supernode --auth-supernode-private-key`` reads the private key with
    ``load_ssh_private_key`` and ``flwr supernode register`` the public key with
    ``load_ssh_public_key``, so both are in OpenSSH format (P-384, the curve Flower's
    docs use). The same key signs the site's SecAgg+ messages (:mod:`fedseal.common.secagg.identity`).
    """
    validate_site_name(name)
    private, public = generate_identity(f"fedseal-{name}")
    return private, f"{public}\n".encode()


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CA_CURVE)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseal"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedseal federation CA"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Hosts, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(SERVER_CURVE)
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise KeysError(
            f"the CA certificate expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
            "create a new federation with --force (every site needs the new ca.pem)"
        )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseal"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts.first()[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(hosts.general_names()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def server_hosts(cert: x509.Certificate) -> set[str]:
    """The DNS names (lower-cased) and IP addresses in ``cert``'s SubjectAlternativeName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {n.lower() for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise KeysError(f"{path} is not a PEM certificate; restore it or start over with --force") from None


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise KeysError(
            f"{path} is not an unencrypted PEM private key; restore it or start over with --force"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeysError(f"{path} is not an EC private key; restore it or start over with --force")
    return key


def _check_issued(server: x509.Certificate, ca: x509.Certificate, out: Path) -> None:
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KeysError(
            f"{out / SERVER_CERT} was not signed by {out / CA_CERT}; the folder mixes "
            "two federations: start over with --force"
        ) from None


def _write_csv(out: Path, overwrite: bool = True) -> list[str]:
    """Rewrite ``supernodes.csv`` from every ``sites/*.pub``; return the site names."""
    rows = ["site,public_key"]
    names = []
    for pub in sorted((out / SITES_DIR).glob("*.pub")):
        if not SITE_NAME.match(pub.stem):
            continue
        fields = pub.read_text(encoding="ascii").split()
        if len(fields) < 2:
            raise KeysError(
                f"{pub} is not an OpenSSH public key; delete it and rerun init for site {pub.stem!r}"
            )
        rows.append(f"{pub.stem},{fields[0]} {fields[1]}")
        names.append(pub.stem)
    _write(out / SUPERNODES_CSV, ("\n".join(rows) + "\n").encode("ascii"), private=False, overwrite=overwrite)
    return names


def init_keys(
    out: str | Path, hosts: Hosts | None, *, force: bool = False, days: int = 365, ca_days: int = 3650
) -> KeysResult:
    """Create (or complete) a federation's keys in ``out``; see the module docstring.

    Parameters
    ----------
    out
        The folder to write to; created (mode 0700) if missing.
    hosts
        Names and addresses of the SuperLink. Required when there is no server
        certificate yet; when there is one it must cover exactly these hosts.
        ``127.0.0.1`` and ``::1`` are always added (see :meth:`Hosts.with_loopback`).
    force
        Replace the CA, the server certificate and key instead of refusing.
        Every site then needs the new ``ca.pem``.
    days, ca_days
        Validity of the server certificate and of the CA certificate.

    Raises
    ------
    KeysError
        On a bad name, a file that would be overwritten, or an inconsistent folder.
    """
    if days < 1 or ca_days < 1:
        raise KeysError("--days and --ca-days must be at least 1")
    out = Path(out)
    hosts = hosts.with_loopback() if hosts is not None else None
    result = KeysResult(out=out)
    if out.exists() and not out.is_dir():
        raise KeysError(f"--out {out} exists and is not a folder")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    (out / SITES_DIR).mkdir(mode=0o700, exist_ok=True)
    ca_cert_p, ca_key_p = out / CA_CERT, out / CA_KEY
    srv_cert_p, srv_key_p = out / SERVER_CERT, out / SERVER_KEY

    # Decide everything before writing anything, so a refusal leaves the folder as it was.
    new_ca = force or not ca_cert_p.exists()
    if not new_ca and not ca_key_p.exists() and not srv_cert_p.exists():
        raise KeysError(
            f"{ca_cert_p} exists but {ca_key_p} does not, so no server certificate "
            "can be signed; put the CA key back or start over with --force"
        )
    if new_ca and not force and ca_key_p.exists():
        raise KeysError(
            f"{ca_key_p} exists without {ca_cert_p}; the folder is incomplete: "
            "restore ca.pem or start over with --force"
        )
    new_server = new_ca or not srv_cert_p.exists()
    if not new_server:
        if not srv_key_p.exists():
            raise KeysError(
                f"{srv_cert_p} exists but {srv_key_p} does not; restore the key or start over with --force"
            )
        current = _load_cert(srv_cert_p)
        _check_issued(current, _load_cert(ca_cert_p), out)
        if hosts is not None and server_hosts(current) != hosts.as_set():
            raise KeysError(
                f"{srv_cert_p} covers {sorted(server_hosts(current))} but --server-host asks for "
                f"{sorted(hosts.as_set())}; it was not overwritten: repeat the old hosts, "
                "or add --force to replace all keys (sites then need the new ca.pem and "
                "re-registration)"
            )
    elif not force and srv_key_p.exists():
        raise KeysError(
            f"{srv_key_p} exists without {srv_cert_p}; it was not overwritten: "
            "restore server.pem or add --force"
        )
    if new_server and hosts is None:
        raise KeysError(
            "--server-host is required to create the server certificate: give "
            "the names and addresses sites use to reach the SuperLink"
        )
    if not (new_ca or new_server):
        raise KeysError(
            f"nothing to create: {ca_key_p} and {srv_key_p} already exist and were not "
            "overwritten. To admit a site, use `fedseal keys add-site`; to replace the "
            "certificates, add --force"
        )

    if new_ca:
        ca_key, ca_cert = _make_ca(ca_days)
        _write(ca_key_p, _private_pem(ca_key), private=True, overwrite=force)
        _write(ca_cert_p, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=force)
        result.created += [ca_cert_p, ca_key_p]
    else:
        result.kept.append(ca_cert_p)
        if ca_key_p.exists():
            result.kept.append(ca_key_p)
    if new_server:
        if not new_ca:
            ca_key, ca_cert = _load_ca_key(ca_key_p), _load_cert(ca_cert_p)
        assert hosts is not None
        srv_key, srv_cert = _make_server(ca_key, ca_cert, hosts, days)
        _write(srv_key_p, _private_pem(srv_key), private=True, overwrite=force)
        _write(srv_cert_p, srv_cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=force)
        result.created += [srv_cert_p, srv_key_p]
    else:
        result.kept += [srv_cert_p, srv_key_p]
    result.sites = _write_csv(out)
    result.created.append(out / SUPERNODES_CSV)
    return result


def create_site_key(out: str | Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """At a site: a new key pair ``out/NAME.key`` (0600) and ``out/NAME.pub``; their paths.

    Raises
    ------
    KeysError
        On a bad name, or a key that exists already (unless ``force``).
    """
    validate_site_name(name)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KeysError(f"--out {out} exists and is not a folder")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_p, pub_p = out / f"{name}.key", out / f"{name}.pub"
    if not force and (key_p.exists() or pub_p.exists()):
        raise KeysError(
            f"{key_p if key_p.exists() else pub_p} already exists; it was not "
            "overwritten (a new key must be admitted again: add --force to replace it)"
        )
    private, public = site_key_files(name)
    _write(key_p, private, private=True, overwrite=force)
    _write(pub_p, public, private=False, overwrite=force)
    return key_p, pub_p


def read_site_public_key(path: str | Path) -> bytes:
    """The OpenSSH public-key line of ``path``, checked to be an ECDSA key on a NIST curve.

    Raises
    ------
    KeysError
        If the file is missing, is a private key, or is not such a public key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeysError(f"cannot read the site's public key {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise KeysError(
            f"{path} is a PRIVATE key: a site sends only its .pub file; this site "
            "should make a new key pair (`fedseal keys site --force`)"
        )
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeysError(
            f"{path} is not an OpenSSH public key (the .pub file that `fedseal keys site` writes)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeysError(
            f"{path} is not an ECDSA key; Flower's SuperNode authentication needs "
            "one (`fedseal keys site` makes it)"
        )
    return data.strip() + b"\n"


def add_site(out: str | Path, name: str, pub: str | Path, *, force: bool = False) -> Path:
    """On the server: file a site's public key as ``out/sites/NAME.pub``; its path.

    Raises
    ------
    KeysError
        On a bad name or key, or a different key already filed for ``name``.
    """
    validate_site_name(name)
    out = Path(out)
    if not out.is_dir():
        raise KeysError(f"keys folder {out} does not exist: run `fedseal keys init` first")
    line = read_site_public_key(pub)
    (out / SITES_DIR).mkdir(mode=0o700, exist_ok=True)
    target = out / SITES_DIR / f"{name}.pub"
    if target.exists() and target.read_bytes().split()[:2] == line.split()[:2]:
        return target
    if target.exists() and not force:
        raise KeysError(
            f"{target} holds a different key for site {name!r}; it was not "
            "replaced (add --force if the site really made a new key)"
        )
    _write(target, line, private=False, overwrite=True)
    _write_csv(out)
    return target
