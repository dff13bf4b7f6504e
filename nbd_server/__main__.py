"""python3 -m nbd_server --json OPTIONS: one NBD server (what nbd_server.run
spawns), OPTIONS being nbd_server.service.serve()'s keyword arguments as a JSON
object.  The admin's command for the same thing is `zfs-ng nbd serve`."""

import json
import sys

from nbd_server import service


def main(argv):
    if len(argv) != 2 or argv[0] != "--json":
        sys.stderr.write("usage: python3 -m nbd_server --json OPTIONS\n")
        return 2
    try:
        service.serve(**service.options_from_json(json.loads(argv[1])))
    except (ValueError, service.UsageError) as e:
        sys.stderr.write("nbd_server: %s\n" % e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
