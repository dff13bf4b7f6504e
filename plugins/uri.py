"""The volume URIs: the volume plugin builds them (Volume.stat's "uri"), the
datapath plugins are called with them (sans-IO; below both plugins).

For every volume, URIs of four schemes:

    zfsng-raw://<sr>/<key>              local zvol for tapdisk (or blkback)
    zfsng-nbd://<sr>/<key>              local zvol served over NBD
    nvme+tcp://<host>:<port>/<subnqn>   remote zvol on a storage node,
                                        subnqn = nqn.2014-08.org.zfs-ng:<sr-uuid>:<key>
    nbd+tls://<host>:<port>/<sr-uuid>/<key>
                                        remote zvol on a storage node over NBD with
                                        TLS client certificates

One builder beside each parser: local_uri and remote_uri (nbd_tls_uri from a
host and a port) / parse; subnqn_for / split_subnqn (the subsystem NQN,
NQN_PREFIX); nbd_tls_export / split_nbd_tls_export (the node's NBD export
name).  Everything here comes from outside (xapi, the CLI), so it is validated before
any of it reaches zfs, nvme, a file name or the network.
"""

import re

RAW = "zfsng-raw"
NBD = "zfsng-nbd"
NVME_TCP = "nvme+tcp"
NBD_TLS = "nbd+tls"
SCHEMES = (RAW, NBD, NVME_TCP, NBD_TLS)

NQN_PREFIX = "nqn.2014-08.org.zfs-ng:"

# SR strings and volume keys: what the volume plugin emits (ZFS-safe names,
# uuids, `vol@snap` for snapshots).  No '/', no blanks, no leading '-'.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,254}\Z")
_HOSTNAME = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\Z")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]{2,45}\Z")
# NVMe base spec: NQN at most 223 bytes, UTF-8; we accept printable ASCII only.
_PORT = re.compile(r"^[0-9]{1,5}\Z")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_NQN = re.compile(r"^nqn\.[0-9]{4}-[0-9]{2}\.[A-Za-z0-9.-]+:[\x21-\x7e]{1,200}\Z")


class BadUri(ValueError):
    """The URI is not one zfs-ng publishes."""


class VolumeUri(object):
    """A parsed URI.  For local schemes host/port/subnqn are None; for nvme+tcp
    sr is the SR uuid and key the volume key, both taken from the subnqn; for
    nbd+tls the same, from the path, and subnqn is the volume's NQN (the key of
    the node's records, shared by both transports)."""

    __slots__ = ("uri", "scheme", "sr", "key", "host", "port", "subnqn")

    def __init__(self, uri, scheme, sr, key, host=None, port=None, subnqn=None):
        self.uri = uri
        self.scheme = scheme
        self.sr = sr
        self.key = key
        self.host = host
        self.port = port
        self.subnqn = subnqn

    @property
    def volume_id(self):
        """Identity of the volume whatever the scheme: attachments of one volume
        through different datapaths share one state (and one RO/RW rule)."""
        return "%s/%s" % (self.sr, self.key)

    def __repr__(self):
        return "VolumeUri(%r)" % self.uri


def check_name(what, value):
    if not isinstance(value, str) or not _NAME.match(value):
        raise BadUri("invalid %s %r" % (what, value))
    return value


def check_nqn(nqn):
    if not isinstance(nqn, str) or len(nqn.encode("utf-8")) > 223 or not _NQN.match(nqn):
        raise BadUri("invalid NQN %r" % (nqn,))
    return nqn


def check_host(host):
    if _HOSTNAME.match(host):
        return host
    if _IPV6.match(host) and ":" in host:
        return host
    raise BadUri("invalid host %r" % (host,))


def is_uuid(value):
    """Is value a uuid in canonical form (lower case, hyphens)?"""
    return isinstance(value, str) and bool(_UUID.match(value))


def check_uuid(what, value):
    """A canonical (lower-case) uuid, as the volume plugin writes SR uuids."""
    if not is_uuid(value):
        raise BadUri("invalid %s uuid %r" % (what, value))
    return value


def _host_port(authority, uri, scheme):
    """host:port or [ipv6]:port of a network URI."""
    if authority.startswith("["):
        host, sep, port = authority[1:].partition("]:")
    else:
        host, sep, port = authority.rpartition(":")
    if not sep or not _PORT.match(port) or not 0 < int(port) < 65536:
        raise BadUri("%s URI needs host:port: %r" % (scheme, uri))
    return check_host(host), int(port)


def local_uri(scheme, sr, key):
    """zfsng-raw://SR/KEY or zfsng-nbd://SR/KEY: volume KEY of the SR (a pool
    name) of this host, as the volume plugin names them."""
    if scheme not in (RAW, NBD):
        raise BadUri("not a local scheme: %r" % (scheme,))
    return "%s://%s/%s" % (scheme, sr, key)


def remote_uri(scheme, endpoint, sr_uuid, key):
    """nvme+tcp://ENDPOINT/SUBNQN or nbd+tls://ENDPOINT/SR_UUID/KEY: volume KEY
    of SR sr_uuid served by the storage node at ENDPOINT, HOST:PORT as the SR's
    configuration holds it (nvme-node, nbd-node)."""
    if scheme == NVME_TCP:
        path = subnqn_for(sr_uuid, key)
    elif scheme == NBD_TLS:
        path = nbd_tls_export(sr_uuid, key)
    else:
        raise BadUri("not a remote scheme: %r" % (scheme,))
    return "%s://%s/%s" % (scheme, endpoint, path)


def nbd_tls_uri(host, port, sr_uuid, key):
    """The nbd+tls URI of volume KEY of SR sr_uuid served by the node at
    host:port, both checked (parse() reads it back)."""
    check_host(host)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise BadUri("invalid port %r" % (port,))
    authority = "[%s]" % host if ":" in host else host
    return remote_uri(NBD_TLS, "%s:%d" % (authority, port), sr_uuid, key)


def nbd_tls_export(sr_uuid, key):
    """The NBD export name of a volume on the node's NBD-over-TLS endpoint."""
    return "%s/%s" % (check_uuid("SR", sr_uuid), check_name("key", key))


def split_nbd_tls_export(name):
    """(sr-uuid, key) of an export name made by nbd_tls_export."""
    if not isinstance(name, str):
        raise BadUri("export name must be a string")
    sr, sep, key = name.partition("/")
    if not sep:
        raise BadUri("not a zfs-ng export name: %r" % (name,))
    return check_uuid("SR", sr), check_name("key", key)


def subnqn_for(sr_uuid, key):
    return check_nqn(NQN_PREFIX + "%s:%s" % (check_name("SR", sr_uuid), check_name("key", key)))


def split_subnqn(subnqn):
    """(sr-uuid, key) of a zfs-ng subsystem NQN."""
    check_nqn(subnqn)
    if not subnqn.startswith(NQN_PREFIX):
        raise BadUri("not a zfs-ng subsystem NQN: %r" % subnqn)
    rest = subnqn[len(NQN_PREFIX):]
    sr, sep, key = rest.partition(":")
    if not sep:
        raise BadUri("subsystem NQN without a volume key: %r" % subnqn)
    return check_name("SR", sr), check_name("key", key)


def parse(uri):
    if not isinstance(uri, str):
        raise BadUri("URI must be a string")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in SCHEMES:
        raise BadUri("unsupported URI %r (schemes: %s)" % (uri, ", ".join(SCHEMES)))
    authority, sep, path = rest.partition("/")
    if not sep or not path:
        raise BadUri("URI without a volume: %r" % uri)
    if scheme in (RAW, NBD):
        return VolumeUri(uri, scheme, check_name("SR", authority), check_name("key", path))
    host, port = _host_port(authority, uri, scheme)      # host may be [ipv6]
    if scheme == NBD_TLS:
        # nbd+tls://host:port/sr-uuid/key; subnqn: the node's claim records
        # are shared with nvme+tcp (one read-write host whatever the transport)
        sr, key = split_nbd_tls_export(path)
        return VolumeUri(uri, scheme, sr, key, host=host, port=port, subnqn=subnqn_for(sr, key))
    # nvme+tcp://host:port/subnqn
    sr, key = split_subnqn(path)
    return VolumeUri(uri, scheme, sr, key, host=host, port=port, subnqn=path)
