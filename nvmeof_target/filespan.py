"""Read data that goes to the host straight from the backend's page cache:
a C2HData payload given as (backend, offset, length) and sent with
sendfile(2) by the server, instead of pread into a fresh buffer then a copy
into the socket.  Two user-space copies and an allocation fewer per read
(drivers/nvme/target/tcp.c sends bio pages the same way, with sendpage).

Not used with data digests: the CRC needs the bytes in user space anyway."""

import os


class FileSpan(object):
    __slots__ = ("backend", "offset", "length")

    def __init__(self, backend, offset, length):
        self.backend = backend
        self.offset = offset
        self.length = length          # bytes still to send

    def __len__(self):
        return self.length

    def __bytes__(self):
        """The bytes themselves (sans-IO tests join `Queue.out`)."""
        return bytes(self.backend.read(self.offset, self.length))

    def send(self, sock):
        """Send what the socket takes; True once all is sent.  Raises
        BlockingIOError when the socket is full, OSError if the backend was
        closed under us (volume removed: the connection must go)."""
        fd = self.backend.fd
        if fd < 0:
            raise OSError("backend %s closed under a pending read" % self.backend.path)
        n = os.sendfile(sock.fileno(), fd, self.offset, self.length)
        if n == 0:     # shorter than it claimed (cannot happen past the range checks)
            raise OSError("%s ends before offset %d" % (self.backend.path, self.offset))
        self.offset += n
        self.length -= n
        return self.length == 0
