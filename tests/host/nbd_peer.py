"""NBD peers of the host tests (not a test module).

- xo_connect(address, name): Xen Orchestra's client dialect
  (@vates/nbd-client: fixed newstyle, NBD_OPT_EXPORT_NAME, 134-byte answer);
  recv_exact(sock, n).
- A small PKI made with openssl for the TLS tests: make_ca(dir, subject),
  make_leaf(dir, name, subject, ca, usage, san) and client_dir(...), a
  directory as libnbd's tls-certificates and qemu's tls-creds-x509 dir= want.
"""

import os
import shutil
import socket
import struct
import subprocess

from nbd_server import constants as C


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def xo_connect(address, name, family=socket.AF_INET):
    """@vates/nbd-client: fixed newstyle, EXPORT_NAME, 134-byte answer."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(address)
    magic, opt, hflags = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, opt) == (C.NBDMAGIC, C.IHAVEOPT) and hflags & C.FLAG_FIXED_NEWSTYLE
    s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE))
    raw = name.encode()
    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_EXPORT_NAME, len(raw)) + raw)
    size, flags = struct.unpack(">QH", recv_exact(s, 10))
    assert recv_exact(s, 124) == bytes(124)
    return s, size, flags


def _openssl(*argv):
    subprocess.run(("openssl",) + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   universal_newlines=True, timeout=120, check=True)


def make_ca(d, subj):
    """A CA in d: (key path, cert path)."""
    key, cert = os.path.join(d, "ca-key.pem"), os.path.join(d, "ca-cert.pem")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", subj, "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def make_leaf(d, name, subj, ca, usage, san=None):
    """name-key.pem / name-cert.pem signed by ca (key, cert)."""
    key, csr, cert = (os.path.join(d, "%s-%s.pem" % (name, x)) for x in ("key", "csr", "cert"))
    ext = os.path.join(d, name + ".ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=%s\n" % usage)
        if san:
            f.write("subjectAltName=%s\n" % san)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", subj)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    return key, cert


def client_dir(base, name, ca_cert, key, cert):
    """A directory as libnbd's tls-certificates and qemu's tls-creds-x509 dir= want."""
    d = os.path.join(base, name)
    os.mkdir(d)
    shutil.copy(ca_cert, os.path.join(d, "ca-cert.pem"))
    if cert:
        shutil.copy(cert, os.path.join(d, "client-cert.pem"))
        shutil.copy(key, os.path.join(d, "client-key.pem"))
    return d
