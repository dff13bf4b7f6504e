"""`zfs-ng nbd serve-node`: the storage node's one NBD-over-TLS endpoint for
nbd+tls attachments (plugins/datapath/nbdtls.py on the other hosts).

Exports are not given: they are the node's grants (plugins/datapath/node_nbd.py),
looked up per NBD option for the CN of the client's certificate, which the CA
must have signed; one listener and one thread per connection, no process per
volume; requests of a TLS connection run in order on its thread (an SSL
object is not safe for concurrent reads and writes).  Kernel NBD clients sit idle as long as their VM, so idle connections
are never closed (--idle-timeout 0), and one host's address may hold a
connection per attached volume (--max-per-client).

Files (options or ZFSNG_NBD_NODE_* variables): /etc/zfs-ng/nbd-node/cert.pem,
key.pem (the node's, naming the host in the URIs: DNS or IP SAN), ca.pem (the
CA of the hosts' client certificates).  Unit: nbd_server/zfs-ng-nbd-node.service.
"""

import os

import click

from sr_tools.output import fail

NODE_DIR = "/etc/zfs-ng/nbd-node"


def _default(var, name):
    return os.environ.get(var) or os.path.join(NODE_DIR, name)


@click.command("serve-node")
@click.option("--listen", metavar="ADDR:PORT", show_default="0.0.0.0:10809",
              default=lambda: os.environ.get("ZFSNG_NBD_NODE_LISTEN", "0.0.0.0:10809"),
              help="TCP address (ZFSNG_NBD_NODE_LISTEN).")
@click.option("--cert", default=lambda: _default("ZFSNG_NBD_NODE_CERT", "cert.pem"),
              show_default=NODE_DIR + "/cert.pem", help="The node's PEM certificate.")
@click.option("--key", default=lambda: _default("ZFSNG_NBD_NODE_KEY", "key.pem"),
              show_default=NODE_DIR + "/key.pem", help="Its private key.")
@click.option("--ca", default=lambda: _default("ZFSNG_NBD_NODE_CA", "ca.pem"),
              show_default=NODE_DIR + "/ca.pem", help="The CA of the hosts' client certificates.")
@click.option("--max-connections", default=16384, show_default=True,
              type=click.IntRange(1, 65536))
@click.option("--max-per-client", default=4096, show_default=True, type=click.IntRange(1),
              help="Connections of one host address (one per attached volume).")
@click.option("--handshake-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--idle-timeout", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0: kernel clients idle as long as their VM.")
@click.option("--request-timeout", default=60.0, show_default=True, type=click.FloatRange(0.1))
@click.option("-v", "--verbose", count=True)
def serve_node(listen, cert, key, ca, max_connections, max_per_client, handshake_timeout,
               idle_timeout, request_timeout, verbose):
    """Serve the node's nbd+tls grants until SIGTERM."""
    from nbd_server import service
    from nbd_server.exports import DynamicExports
    from plugins.datapath import node_nbd

    for what, path in (("--cert", cert), ("--key", key), ("--ca", ca)):
        if not os.path.isfile(path):
            fail("%s %s: no such file" % (what, path))
    try:
        service.serve(tcp=listen, tls_cert=cert, tls_key=key, tls_ca=ca,
                      max_connections=max_connections, max_per_client=max_per_client,
                      handshake_timeout=handshake_timeout, idle_timeout=idle_timeout,
                      request_timeout=request_timeout, verbose=verbose,
                      export_source=DynamicExports(node_nbd.lookup, node_nbd.names))
    except service.UsageError as e:
        fail(str(e))
