"""What one target process grants the network before anyone is authenticated:
connection slots, time to complete ICReq + Connect, and bytes buffered.  The
sans-IO Queue takes its budgets as parameters (a `Budget` shared by the queues
of one event loop, `Limits.conn_buffer` per queue); the server enforces the
rest (accept, deadlines) and the back-pressure (a queue over budget is not read).

  max_connections       TCP connections per process; past it a new connection
                        is accepted and closed at once (never left to pile up
                        in the listen backlog)
  max_pending           connections that have not completed ICReq + Connect
                        (+ DH-HMAC-CHAP when the host has a key);
                        when full, the oldest of them is closed for a new one
                        (a legitimate Connect takes milliseconds, a slow one
                        cannot hold the slots)
  max_pending_per_host  the same per source address: one address flooding
                        evicts its own oldest connections, not other hosts'
  connect_timeout       seconds from accept to a completed Connect (and its
                        authentication): then closed
  conn_buffer           bytes one connection may have buffered: replies not yet
                        sent (its host does not read them), input not yet
                        parsed, write data granted by R2T.  Over it, commands
                        wait (the socket is not read, so the host's sends stop:
                        TCP back-pressure) and R2Ts wait for earlier writes to
                        complete; a queue with nothing buffered always takes
                        one command, so a command larger than the budget works
  total_buffer          bytes buffered by all the connections of the process:
                        over it, a connection with replies still buffered takes
                        no new command, one with nothing buffered takes them
                        one at a time (a host that reads its replies is served)
  close_linger          seconds a closing connection may take to flush its last
                        bytes (a TermReq to a host that reads nothing)

The worst case is bounded: total_buffer, plus per connection one command's
data (MDTS, 1 MiB) and one receive (server.RECV_SIZE) beyond its conn_buffer.
"""

MiB = 1 << 20


class Limits(object):
    __slots__ = ("max_connections", "max_pending", "max_pending_per_host", "connect_timeout",
                 "conn_buffer", "total_buffer", "close_linger")

    def __init__(self, max_connections=16384, max_pending=1024, max_pending_per_host=64,
                 connect_timeout=10.0, conn_buffer=4 * MiB, total_buffer=256 * MiB,
                 close_linger=5.0):
        self.max_connections = int(max_connections)
        self.max_pending = int(max_pending)
        self.max_pending_per_host = int(max_pending_per_host)
        self.connect_timeout = float(connect_timeout)
        self.conn_buffer = int(conn_buffer)
        self.total_buffer = int(total_buffer)
        self.close_linger = float(close_linger)
        for name in ("max_connections", "max_pending", "max_pending_per_host", "conn_buffer",
                     "total_buffer"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be at least 1" % name)
        if not self.connect_timeout > 0 or not self.close_linger > 0:
            raise ValueError("timeouts must be positive")

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}


class Budget(object):
    """Bytes buffered by all the queues of one event loop (they charge and
    release it themselves).  total None: no limit (sans-IO use, tests)."""
    __slots__ = ("total", "used")

    def __init__(self, total=None):
        self.total = total
        self.used = 0

    def fits(self, n):
        return self.total is None or self.used + n <= self.total
