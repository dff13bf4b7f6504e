"""NBD over TLS with client certificates: who may talk to the server at all.

As qemu-nbd's `tls-creds-x509,verify-peer=on` plus `tls-authz`: with a CA,
a client must present a certificate that CA signed (the TLS handshake fails
otherwise), and with an allow list its subject must match one entry, checked
right after the handshake, before the client can send a single option: no
export is listed, described or read by anyone else.  A CA makes TLS
mandatory (the server refuses every option but STARTTLS before it).

Allow-list entries are distinguished names, RFC 4514 style as GnuTLS/qemu print
them: `CN=backup1`, or `CN=xo.example.com,O=Example,C=FR`.  An entry matches
when the subject has every attribute=value it names (attribute names are
case-insensitive: CN, O, OU, C, ST, L, DC, UID, emailAddress; values exact;
`\\,` for a comma in a value).  So `CN=backup1` admits any certificate of the
CA with that common name; give the whole DN to pin more.

    zfs-ng nbd serve --tcp 0.0.0.0:10809 --export vol1=/dev/zvol/tank/vol1 \\
        --tls-cert server-cert.pem --tls-key server-key.pem \\
        --tls-ca ca-cert.pem --tls-allow 'CN=backup1' --tls-allow 'CN=xo,O=Example'

Clients: libnbd `nbds://host/vol1?tls-certificates=DIR` and qemu
`--object tls-creds-x509,id=tls0,dir=DIR,endpoint=client`, DIR holding
ca-cert.pem, client-cert.pem and client-key.pem.
"""

import logging
import ssl

log = logging.getLogger("nbd_server")

# getpeercert() long names -> the short RFC 4514 / GnuTLS ones
_SHORT = {
    "commonname": "CN", "organizationname": "O", "organizationalunitname": "OU",
    "countryname": "C", "stateorprovincename": "ST", "localityname": "L",
    "domaincomponent": "DC", "userid": "UID", "emailaddress": "EMAILADDRESS",
    "streetaddress": "STREET", "serialnumber": "SERIALNUMBER", "title": "TITLE",
    "givenname": "GN", "surname": "SN",
}
_ALIASES = {"E": "EMAILADDRESS", "EMAIL": "EMAILADDRESS"}


def parse_identity(text):
    """'CN=a,O=b' -> [("CN", "a"), ("O", "b")]; ValueError if it is not a DN."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty --tls-allow entry")
    parts, cur, esc = [], [], False
    for ch in text:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if esc:
        raise ValueError("--tls-allow %r ends with a backslash" % text)
    parts.append("".join(cur))
    out = []
    for p in parts:
        attr, sep, value = p.partition("=")
        attr = attr.strip().upper()
        if not sep or not attr or not value.strip():
            raise ValueError("--tls-allow %r: want ATTR=VALUE[,ATTR=VALUE...], e.g. CN=client1"
                             % text)
        out.append((_ALIASES.get(attr, attr), value.strip()))
    return out


def subject_of(cert):
    """[(attr, value)] of a certificate as ssl.SSLSocket.getpeercert() gives it."""
    out = []
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            out.append((_SHORT.get(name.lower(), name.upper()), value))
    return out


def dn_string(subject):
    return ",".join("%s=%s" % (a, v.replace(",", "\\,")) for a, v in reversed(subject))


def allowed(subject, allow):
    have = set(subject)
    return any(all(pair in have for pair in entry) for entry in allow)


class AuthzContext(ssl.SSLContext):
    """A server context that, after the handshake, checks the client's subject
    against the allow list (empty: any certificate the CA signed)."""

    allow = ()

    def wrap_socket(self, sock, *args, **kw):
        tls = ssl.SSLContext.wrap_socket(self, sock, *args, **kw)
        if self.allow:
            subject = subject_of(tls.getpeercert())
            if not allowed(subject, self.allow):
                dn = dn_string(subject) or "(no subject)"
                tls.close()
                log.warning("client certificate %s is not allowed: connection refused", dn)
                raise PermissionError("client certificate %s is not allowed" % dn)
            log.info("client certificate %s allowed", dn_string(subject))
        return tls


def server_context(cert, key, ca=None, allow=()):
    """The ssl context for serve(): plain TLS with a certificate, or with ca
    (and allow) the client certificate check described above."""
    allow = [parse_identity(a) for a in allow or ()]
    if allow and not ca:
        raise ValueError("--tls-allow needs --tls-ca: an identity means nothing unverified")
    ctx = AuthzContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.allow = allow
    return ctx
