"""NQN validation (NVMe base spec §4.5: at most 223 bytes of UTF-8, 'nqn.' prefix).
We accept printable ASCII only: names reach configfs-like tables, logs and sockets."""

import re

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
MAX_NQN = 223
_NQN = re.compile(r"^nqn\.[\x21-\x7e]+\Z")


def valid_nqn(nqn):
    return (isinstance(nqn, str) and len(nqn.encode("utf-8")) <= MAX_NQN
            and _NQN.match(nqn) is not None)


def check_nqn(nqn, what="NQN"):
    if not valid_nqn(nqn):
        raise ValueError("invalid %s %r: need 'nqn.' + printable ASCII, at most %d bytes"
                         % (what, nqn, MAX_NQN))
    return nqn


def cstr(raw):
    """A NUL-terminated fixed-size field as str ('' if not valid ASCII)."""
    raw = bytes(raw).split(b"\0", 1)[0]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return ""
