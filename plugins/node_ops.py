"""What another host runs on a storage node: the node's operation table, and
the process that runs one op.

OPS, by who asks:
  grant, claim, unclaim, revoke          an nvme+tcp host (plugins/datapath/node.py)
  nbd_grant, nbd_claim, nbd_unclaim, nbd_revoke
                                         an nbd+tls host (plugins/datapath/node_nbd.py)
  sr_attach, sr_detach                   a host plugging a shared SR
                                         (plugins/volume/remote.py)
  volume(method, params)                 a host running one SR/Volume method of the
                                         volume plugin's table here (remote.routed)

plugins/nodes.py carries an op to the node: `python3 -m plugins.node_ops OP`
reads one JSON object of arguments on stdin and prints one JSON line,
{"result": ...} or {"error": [name, message]}.  When the node is the caller's
own machine, the caller runs the op's function in-process instead (the same
function this table names), so neither plugin imports this module: it stands
above both.
"""

import json
import sys

from plugins import smapi, uri
from plugins.datapath import node
from plugins.volume import methods, remote

# the SR- and Volume-level methods another host may run here: those that take
# the SR string (SR.create/probe take a configuration); attach and detach have
# their own ops
_METHODS = {m.full_name: m for m in methods.SR + methods.VOLUME
            if m.full_name not in ("SR.attach", "SR.detach")}


def volume(method, params):
    """Node op `volume`: run one SR/Volume method here, as a plugin call would."""
    m = _METHODS.get(method)
    if m is None:
        raise smapi.Unimplemented(str(method))
    if isinstance(params, dict) and remote.parse_remote_sr(params.get("sr")) is not None:
        raise smapi.InvalidParameters("a node does not forward again")
    return smapi.plain(m.fn(**m.bind(params)))


OPS = dict(node.OPS)
OPS.update({"volume": volume, "sr_attach": remote.op_sr_attach,
            "sr_detach": remote.op_sr_detach})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in OPS:
        sys.stderr.write("usage: python3 -m plugins.node_ops {%s} < ARGS.json\n"
                         % ",".join(sorted(OPS)))
        return 2
    try:
        args = json.loads(sys.stdin.readline())
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
        out = {"result": OPS[argv[0]](**args)}
    except smapi.SmapiError as e:
        out = {"error": [e.name, e.message]}
    except (ValueError, TypeError, uri.BadUri) as e:
        out = {"error": ["Invalid_parameters", str(e)]}
    except Exception as e:      # the host gets an error, never a traceback
        smapi.log.exception("node op %s failed", argv[0])
        out = {"error": ["Internal_error", "%s: %s" % (type(e).__name__, e)]}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0 if "result" in out else 1


if __name__ == "__main__":
    sys.exit(main())
