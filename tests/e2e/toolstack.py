"""A model of XCP-ng 8.3's toolstack as it drives a SMAPIv3 plugin, for the VM
tests (tests/e2e/test_toolstack.py): xapi, its storage multiplexer,
xapi-storage-script, xenopsd with its `block` hotplug script, the blkback and
tapback backends, and xapi-nbd.  Every plugin call goes through the plugin
executables exactly as xapi-storage-script makes it (`<dir>/<Method> --json`,
the named arguments as one JSON object on stdin, the result or error JSON on
stdout).

Written from the sources (quoted and explained in /work/notes/toolstack.md):

    xapi-project/xen-api e2ee48d6883e0b98c4d219d3f0778a10c6655607
        ocaml/xapi-storage-script/main.ml        "XSS" below
        ocaml/xapi/storage_mux.ml                activate3 (RO or RW activation)
        ocaml/xapi/storage_access.ml             create_sr, attach_and_activate, datapath_of_vbd
        ocaml/xapi/xapi_sr.ml                    create, probe, probe_ext, update_vdis, scan
        ocaml/xapi/xapi_pbd.ml                   plug, unplug
        ocaml/xapi/xapi_vdi.ml                   create, snapshot_and_clone, set_on_boot, ...
        ocaml/xapi/xapi_vbd_helpers.ml           VDI_IN_USE / VDI_READONLY checks
        ocaml/xapi/smint.ml                      the capability table
        ocaml/xapi-idl/storage/storage_interface.ml  implementations_of_backend
        ocaml/xenopsd/lib/xenops_server.ml       VM_start / VM_poweroff atomics
        ocaml/xenopsd/lib/storage.ml             attach / activate / deactivate / dp_destroy
        ocaml/xenopsd/xc/xenops_server_xen.ml    params_of_backend, VBD.attach/activate/deactivate/detach
        ocaml/xenopsd/scripts/block              the hotplug script
        ocaml/nbd/src/main.ml, lib/consts.ml     xapi-nbd: a RO dom0 VBD per connection, at most 16
        ocaml/libs/clock/date.ml                 to_rfc3339 / of_iso8601
    xapi-project/blktap v3.55.5 (XCP-ng 8.3's blktap 3.x)
        tapback/backend.c                        physical_device_changed, find_tapdisk
        tapback/tapback.c                        get_tapdev_major
        control/tap-ctl.c                        tap-ctl list output (tap_cli_list_dict)
    xcp-ng-rpms/xcp-ng-xapi-storage SPECS/xcp-ng-xapi-storage.spec 1.2.1
        qemuback / datapath-qemudisk disabled: nothing serves a `qdisk` VBD

What is not modelled: the message switch and xapi's own DB beyond the fields
used here, RRD datasources (XSS registers xeno+shm ones at SR.attach), the
PVS 3.0 compat shims of XSS (our plugins declare 5.0), storage migration
(DATA.mirror, import_activate, get_nbd_server), real Xen rings: a backend here
is the device the real backend would open, read and written by the test
process in place of the guest's blkfront.  There is no blktap in the test VM:
tests/e2e/tapctl_model.py stands in for tap-ctl and our tapback serves the
path its tapdisk records as open.
"""

import base64
import calendar
import contextlib
import hashlib
import json
import mmap
import os
import re
import signal
import stat as stat_mod
import subprocess
import threading
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VOLUME_QUEUE = "org.xen.xapi.storage.zfs-ng"
PLUGIN_VOLUME = os.path.join(ROOT, "plugins", "volume", VOLUME_QUEUE)
PLUGIN_DATAPATH = os.path.join(ROOT, "plugins", "datapath")
DATAPATHS = ("zfsng-raw", "zfsng-nbd", "nvme+tcp", "nbd+tls")
TAPCTL_MODEL = os.path.join(HERE, "tapctl_model.py")
SCRIPT_TIMEOUT = 600
# ZFSNG_TOOLSTACK_TRACE=FILE: every plugin call appended to FILE as a JSON line
TRACE = os.environ.get("ZFSNG_TOOLSTACK_TRACE")

# XSS main.ml l.352-372
NONPERSISTENT = "NONPERSISTENT"
VDI_MIRROR_IN = "VDI_MIRROR_IN"
CLONE_ON_BOOT = "clone-on-boot"
VDI_TYPE = "vdi-type"
CONTENT_ID = "content_id"
SM_CONFIG_PREFIX = "_sm_config_"
SNAPSHOT_TIME = "snapshot_time"
IS_A_SNAPSHOT = "is_a_snapshot"
SNAPSHOT_OF = "snapshot_of"
TAGS_PREFIX = "tags"

# XSS main.ml: pvs_version, supported_api_versions, api_max
SUPPORTED_API_VERSIONS = ("3.0", "5.0")
API_MAX = "5.0"

# smint.ml string_to_capability_table (unknown names are dropped with a warning)
KNOWN_CAPABILITIES = frozenset("""
SR_CREATE SR_DELETE SR_ATTACH SR_DETACH SR_SCAN SR_PROBE SR_UPDATE
SR_SUPPORTS_LOCAL_CACHING SR_METADATA SR_TRIM SR_MULTIPATH SR_CACHING SR_STATS
VDI_CREATE VDI_DELETE VDI_ATTACH VDI_DETACH VDI_MIRROR VDI_MIRROR_IN VDI_RESIZE
VDI_RESIZE_ONLINE VDI_CLONE VDI_SNAPSHOT VDI_ACTIVATE VDI_ACTIVATE_READONLY
VDI_DEACTIVATE VDI_UPDATE VDI_INTRODUCE VDI_GENERATE_CONFIG VDI_ATTACH_OFFLINE
VDI_RESET_ON_BOOT VDI_CONFIG_CBT VDI_COMPOSE LARGE_VDI THIN_PROVISIONING
VDI_READ_CACHING VDI_REVERT""".split())

# xapi-nbd lib/consts.ml
NBD_CONNECTION_LIMIT = 16


# -- errors ---------------------------------------------------------------------------

class StorageError(Exception):
    """A Storage_interface.Errors.error as xapi receives it from XSS.

    name: the constructor (Backend_error, Backend_error_with_backtrace,
    Sr_not_attached, Sr_unhealthy, Activated_on_another_host, Internal_error,
    No_storage_plugin_for_sr); code/params: for the Backend_error ones, the code
    (SR_BACKEND_FAILURE from zfs-ng, SCRIPT_FAILED, MISSING_URI...) and the
    params without XSS's backtrace; `smapi` is the plugin's own error name
    (params[0] of a script error: Volume_in_use, ...)."""

    def __init__(self, name, code=None, params=(), backtrace=None):
        self.name = name
        self.code = code
        self.params = list(params)
        self.backtrace = backtrace
        Exception.__init__(self, "%s%s %s" % (name, "(%s)" % code if code else "",
                                              json.dumps(self.params)[:2000]))

    @property
    def smapi(self):
        return self.params[0] if self.params else None


def script_failed(*params):
    return StorageError("Backend_error", "SCRIPT_FAILED", params)


class XapiError(Exception):
    """An Api_errors.Server_error (VDI_IN_USE, VDI_READONLY, SR_BACKEND_FAILURE...)."""

    def __init__(self, code, *params):
        self.code = code
        self.params = list(params)
        Exception.__init__(self, "%s %s" % (code, self.params))


class XenopsdError(Exception):
    """What a xenopsd VBD plug fails with: Internal_error, Device_error..."""


# -- fork_exec_rpc ----------------------------------------------------------------------

def script_path(script_dir, name):
    """XSS Script.path: the script, found case-insensitively, must be an
    executable file (symlinks followed)."""
    path = os.path.join(script_dir, name)
    if not os.path.isfile(path):
        try:
            for f in sorted(os.listdir(script_dir)):
                if f.lower() == name.lower():
                    path = os.path.join(script_dir, f)
                    break
        except OSError:
            pass
    if not os.path.isfile(path):
        raise StorageError("Backend_error", "SCRIPT_MISSING",
                           [path, "Check whether the file exists and has correct permissions"])
    if not os.access(path, os.X_OK):
        raise StorageError("Backend_error", "SCRIPT_NOT_EXECUTABLE", [path, "EACCES"])
    return path


class Scripts(object):
    """XSS fork_exec_rpc: one process per call; every call is logged."""

    def __init__(self, host):
        self.host = host
        self.log = []
        self._lock = threading.Lock()

    def call(self, script_dir, method, args):
        args = dict(args)
        params = {"dbg": args.pop("dbg", "toolstack-model")}
        params.update(args)
        path = script_path(script_dir, method)
        t0 = time.time()
        argv = [path, "--json"]
        if self.host.netns:         # a host elsewhere: its own network namespace
            argv = ["ip", "netns", "exec", self.host.netns] + argv
        p = subprocess.run(argv, input=json.dumps(params), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           env=self.host.script_env(), timeout=SCRIPT_TIMEOUT)
        entry = {"dir": os.path.basename(script_dir), "method": method, "args": args,
                 "rc": p.returncode, "seconds": round(time.time() - t0, 2), "t": t0}
        with self._lock:
            self.log.append(entry)
        try:
            return self._result(path, p, entry)
        finally:
            if TRACE:
                with self._lock, open(TRACE, "a") as f:
                    f.write(json.dumps(dict(entry, host=self.host.name, stderr=p.stderr[-2000:],
                                            out=p.stdout[-300:])) + "\n")

    def _result(self, path, p, entry):
        if p.returncode != 0:
            if p.returncode < 0:
                raise script_failed(path, "signalled", str(-p.returncode), p.stdout, p.stdout)
            try:
                err = json.loads(p.stdout)
                code, eparams, bt = err["code"], err["params"], err["backtrace"]
                assert isinstance(code, str)
                assert isinstance(eparams, list) and all(isinstance(x, str) for x in eparams)
                assert isinstance(bt, dict) and isinstance(bt.get("error"), str)
                assert isinstance(bt.get("files"), list) and isinstance(bt.get("lines"), list)
            except (ValueError, KeyError, TypeError, AssertionError):
                entry["error"] = "bad error json"
                raise script_failed(path, "non-zero exit and bad json on stdout",
                                    str(p.returncode), p.stdout, p.stdout)
            entry["error"] = eparams
            # backend_backtrace_error (XSS main.ml)
            if len(eparams) == 2 and eparams[0] == "Activated_on_another_host":
                raise StorageError("Activated_on_another_host", None, [eparams[1]])
            raise StorageError("Backend_error_with_backtrace", code, eparams, bt)
        try:
            return json.loads(p.stdout)
        except ValueError:
            entry["error"] = "bad json"
            raise script_failed(path, "bad json on stdout", p.stdout)

    def calls(self, method=None, dir=None):
        with self._lock:
            return [e for e in self.log if (method is None or e["method"] == method)
                    and (dir is None or e["dir"] == dir)]


# -- the IDL types the responses must unmarshal into (rpclib, ocaml/xapi-storage) -----

class Unmarshal(Exception):
    pass


def _need(cond, what):
    if not cond:
        raise Unmarshal(what)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _check_pairs(d, what):
    _need(isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str)
                                      for k, v in d.items()), what + ": (string * string) list")


def check_sr_stat(s):
    _need(isinstance(s, dict), "sr_stat: not a record")
    for k in ("sr", "name", "description"):
        _need(isinstance(s.get(k), str), "sr_stat.%s" % k)
    for k in ("free_space", "total_space"):
        _need(_is_int(s.get(k)), "sr_stat.%s" % k)
    _need(isinstance(s.get("clustered"), bool), "sr_stat.clustered")
    _need(isinstance(s.get("datasources"), list), "sr_stat.datasources")
    _need(s.get("uuid") is None or isinstance(s.get("uuid"), str), "sr_stat.uuid")
    h = s.get("health")
    _need(isinstance(h, list) and len(h) == 2 and h[0] in
          ("Healthy", "Recovering", "Unreachable", "Unavailable") and isinstance(h[1], str),
          "sr_stat.health %r" % (h,))
    return s


def check_volume(v):
    _need(isinstance(v, dict), "volume: not a record")
    for k in ("key", "name", "description"):
        _need(isinstance(v.get(k), str), "volume.%s" % k)
    for k in ("read_write", "sharable"):
        _need(isinstance(v.get(k), bool), "volume.%s" % k)
    for k in ("virtual_size", "physical_utilisation"):
        _need(_is_int(v.get(k)), "volume.%s" % k)
    _need(isinstance(v.get("uri"), list) and all(isinstance(u, str) for u in v["uri"]),
          "volume.uri")
    _check_pairs(v.get("keys"), "volume.keys")
    _need(v.get("uuid") is None or isinstance(v.get("uuid"), str), "volume.uuid")
    _need(v.get("cbt_enabled") is None or isinstance(v.get("cbt_enabled"), bool),
          "volume.cbt_enabled")
    return v


def check_probe_results(rs):
    _need(isinstance(rs, list), "probe_results: not a list")
    for r in rs:
        _need(isinstance(r, dict), "probe_result: not a record")
        _check_pairs(r.get("configuration"), "probe_result.configuration")
        _need(isinstance(r.get("complete"), bool), "probe_result.complete")
        _check_pairs(r.get("extra_info"), "probe_result.extra_info")
        if r.get("sr") is not None:
            check_sr_stat(r["sr"])
    return rs


def check_backend(b):
    _need(isinstance(b, dict) and isinstance(b.get("implementations"), list), "backend")
    for i in b["implementations"]:
        _need(isinstance(i, list) and len(i) == 2 and isinstance(i[1], dict), "implementation")
        kind, x = i
        if kind == "XenDisk":
            _need(isinstance(x.get("params"), str) and isinstance(x.get("backend_type"), str),
                  "XenDisk")
            _check_pairs(x.get("extra"), "XenDisk.extra")
        elif kind in ("BlockDevice", "File"):
            _need(isinstance(x.get("path"), str), kind)
        elif kind == "Nbd":
            _need(isinstance(x.get("uri"), str), "Nbd")
        else:
            raise Unmarshal("unknown implementation %r" % kind)
    return b


def check_query(q):
    _need(isinstance(q, dict), "query_result")
    for k in ("plugin", "name", "description", "vendor", "copyright", "version",
              "required_api_version"):
        _need(isinstance(q.get(k), str), "query_result.%s" % k)
    _need(isinstance(q.get("features"), list) and all(isinstance(f, str) for f in q["features"]),
          "query_result.features")
    _check_pairs(q.get("configuration"), "query_result.configuration")
    _need(isinstance(q.get("required_cluster_stack"), list), "query_result.required_cluster_stack")
    return q


def _typed(check, value):
    try:
        return check(value)
    except Unmarshal as e:
        # return_rpc: an exception while unmarshalling -> SCRIPT_FAILED
        raise script_failed("Unexpected exception:Rpcmarshal: %s: %s"
                            % (e, json.dumps(value)[:500]))


# -- smint.ml -------------------------------------------------------------------------

def parse_capabilities(features):
    """Smint.Feature.parse_capability_int64: NAME or NAME/<int64>; unknown
    names dropped; duplicates removed (sort_uniq on the name)."""
    out = {}
    for f in features:
        parts = f.split("/")
        if len(parts) > 2:
            continue
        name = parts[0]
        try:
            version = int(parts[1]) if len(parts) == 2 else 1
        except ValueError:
            version = 1
        if name not in KNOWN_CAPABILITIES:
            continue   # "SM.feature: unknown feature %s"
        out.setdefault(name, version)
    return out


# -- clock/date.ml ----------------------------------------------------------------------

def now_rfc3339():
    """Clock.Date.(to_rfc3339 (now ())): "%04i%02i%02iT%02i:%02i:%02iZ", no hyphens
    ("Because some client limitations, the hyphens ... have to be absent")."""
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())


_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?"
                      r"([Zz]|[+-]\d{2}:\d{2})$")


def of_iso8601(x):
    """Date.of_iso8601: the DB fast path "YYYYMMDDTHH:MM:SSZ", else the best
    effort conversion to RFC 3339 and Ptime.of_rfc3339; invalid_arg otherwise.
    Returns seconds since the epoch."""
    if len(x) > 5 and x[4] != "-" and x.endswith("Z"):
        m = re.match(r"^(\d{4})(\d{2})(\d{2})T(\d{2}):(\d{2}):(\d{2})Z$", x)
        if not m:
            raise ValueError("Date.of_iso8601: %s" % x)
        return calendar.timegm(tuple(int(g) for g in m.groups()))
    y = x
    m = re.match(r"^(\d{4})(\d{2})(\d{2})T(.*)$", y)
    if m:
        y = "%s-%s-%sT%s" % m.groups()
    if re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$", y):
        y += "Z"
    m = _RFC3339.match(y)
    if not m:
        raise ValueError("Date.of_iso8601: %s" % x)
    t = calendar.timegm(tuple(int(g) for g in m.groups()[:6]))
    tz = m.group(8)
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        t -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return t


# -- xapi-storage-script ---------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def uri_scheme(u):
    """Uri.scheme (Uri.of_string x)."""
    m = _SCHEME.match(u)
    return m.group(1).lower() if m else None


def domain_of(dp, vm):
    """XSS domain_of (l.77, since v24.40.0): a guest's domid as is; dom0 gets
    "u0-" ^ dp with every '/' and '-' turned into '_' (so "u0_...")."""
    if vm == "0":
        return re.sub(r"[/-]", "_", "u0-" + dp)
    return vm


def bool_of_string(s):
    """OCaml bool_of_string: exactly "true" or "false", Invalid_argument otherwise."""
    if s == "true":
        return True
    if s == "false":
        return False
    raise ValueError('Invalid_argument("bool_of_string") on %r' % (s,))


def vdi_of_volume(v):
    """XSS vdi_of_volume (l.736): a volume as a SMAPIv2 vdi_info."""
    keys = v["keys"]
    try:
        is_snap = bool_of_string(keys[IS_A_SNAPSHOT]) if IS_A_SNAPSHOT in keys else False
    except ValueError as e:
        raise StorageError("Internal_error", None, [str(e)])
    return {
        "vdi": v["key"],
        "uuid": v.get("uuid"),
        "content_id": keys.get(CONTENT_ID, ""),
        "name_label": v["name"],
        "name_description": v["description"],
        "ty": keys.get(VDI_TYPE, ""),
        "metadata_of_pool": "",
        "is_a_snapshot": is_snap,
        "snapshot_time": keys.get(SNAPSHOT_TIME, "19700101T00:00:00Z"),
        "snapshot_of": keys.get(SNAPSHOT_OF, ""),
        "read_only": not v["read_write"],
        "cbt_enabled": bool(v.get("cbt_enabled") or False),
        "virtual_size": v["virtual_size"],
        "physical_utilisation": v["physical_utilisation"],
        "sm_config": {k[len(SM_CONFIG_PREFIX):]: x for k, x in keys.items()
                      if k.startswith(SM_CONFIG_PREFIX)},
        "sharable": v["sharable"],
        "persistent": True,
        "tags": [k[len(TAGS_PREFIX):] for k in keys if k.startswith(TAGS_PREFIX)],
    }


def health_variant(h):
    return h[0]   # Healthy | Recovering | Unreachable | Unavailable


def sr_info_of_stat(s):
    return {"sr_uuid": s.get("uuid"), "name_label": s["name"],
            "name_description": s["description"], "total_space": s["total_space"],
            "free_space": s["free_space"], "clustered": s["clustered"],
            "health": health_variant(s["health"])}


class Xss(object):
    """ocaml/xapi-storage-script/main.ml for the volume plugin of one SR type
    and the datapath plugins of one host."""

    def __init__(self, host):
        self.host = host
        self.volume_dir = os.path.join(host.storage_root, "volume", VOLUME_QUEUE)
        self.datapath_root = os.path.join(host.storage_root, "datapath")
        self.datapaths = {}        # Datapath_plugins.table: scheme -> (script_dir, query)
        self.rejected = {}         # datapath dirs not registered, with why
        self.query = None          # QueryImpl.query_impl result (SM record)
        self.version = None        # M.version
        self.attached = {}         # Attached_SRs: xapi SR uuid -> plugin's sr
        self.warnings = []
        self._lock = threading.Lock()

    def _rpc(self, script_dir, method, **args):
        return self.host.scripts.call(script_dir, method, args)

    def _volume(self, method, **args):
        return self._rpc(self.volume_dir, method, **args)

    # -- registration (watch_volume_plugins / watch_datapath_plugins) ---------------

    def register(self):
        names = sorted(os.listdir(self.datapath_root))
        with ThreadPoolExecutor(len(names) + 1) as ex:
            q = ex.submit(self.query_impl)
            for f in [ex.submit(self._register_datapath, n) for n in names]:
                f.result()
            self.query = q.result()
        return self.query

    def _register_datapath(self, name):
        """Datapath_plugins.register (l.695) + check_plugin_version_compatible
        (l.309): a plugin that fails either is silently not registered."""
        script_dir = os.path.join(self.datapath_root, name)
        try:
            response = _typed(check_query, self._rpc(script_dir, "Plugin.Query", dbg="register"))
        except StorageError as e:
            with self._lock:
                self.rejected[name] = str(e)
            return
        v = response["required_api_version"]
        if v != API_MAX:
            with self._lock:
                self.warnings.append("Using deprecated SMAPIv3 API version %s, latest is %s. "
                                     "Update your %s plugin!" % (v, API_MAX, response["name"]))
        if v not in SUPPORTED_API_VERSIONS:
            with self._lock:
                self.rejected[name] = "%s requires unknown SMAPI API version %s, supported: %s" % (
                    response["name"], v, ",".join(SUPPORTED_API_VERSIONS))
            return
        with self._lock:
            self.datapaths[name] = (script_dir, response)

    def supports_feature(self, scheme, feature):
        """Datapath_plugins.supports_feature: the datapath's own Query features."""
        entry = self.datapaths.get(scheme)
        return entry is not None and feature in entry[1]["features"]

    def query_impl(self):
        """QueryImpl.query_impl (l.874): the plugin's features (VDI_DESTROY
        renamed VDI_DELETE), those of the scripts present, the fixed ones, and
        VDI_RESET_ON_BOOT/2 when VDI_CLONE is there."""
        response = _typed(check_query, self._volume("Plugin.Query"))
        self.version = response["required_api_version"]
        features = ["VDI_DELETE" if f == "VDI_DESTROY" else f for f in response["features"]]
        acc = []
        for script, capability in [
                ("SR.attach", "SR_ATTACH"), ("SR.create", "SR_CREATE"),
                ("SR.destroy", "SR_DELETE"), ("SR.detach", "SR_DETACH"), ("SR.ls", "SR_SCAN"),
                ("SR.stat", "SR_UPDATE"), ("SR.probe", "SR_PROBE"),
                ("Volume.create", "VDI_CREATE"), ("Volume.clone", "VDI_CLONE"),
                ("Volume.snapshot", "VDI_SNAPSHOT"), ("Volume.resize", "VDI_RESIZE"),
                ("Volume.destroy", "VDI_DELETE"), ("Volume.stat", "VDI_UPDATE")]:
            try:
                script_path(self.volume_dir, script)
            except StorageError:
                continue
            acc.insert(0, capability)
        features = features + acc
        features = features + ["VDI_ATTACH", "VDI_DETACH", "VDI_ACTIVATE", "VDI_DEACTIVATE",
                               "VDI_INTRODUCE"]
        if "VDI_CLONE" in features:
            features = ["VDI_RESET_ON_BOOT/2"] + features
        return {
            "driver": response["plugin"], "name": response["name"],
            "description": response["description"], "vendor": response["vendor"],
            "copyright": response["copyright"], "version": response["version"],
            "required_api_version": response["required_api_version"],
            "features": features, "configuration": response["configuration"],
            "required_cluster_stack": response["required_cluster_stack"],
            "smapi_version": "SMAPIv3",
        }

    # -- choose_datapath (l.798) -------------------------------------------------------

    def choose_datapath(self, volume, persistent=True):
        possible = []
        for u in volume["uri"]:
            scheme = uri_scheme(u)
            if scheme is None:
                continue
            entry = self.datapaths.get(scheme)
            if entry is not None:
                possible.append((entry[0], scheme, u))
        if not persistent:
            nonp = [p for p in possible if self.supports_feature(p[1], NONPERSISTENT)]
            possible = nonp + [p for p in possible if p not in nonp]
        if not possible:
            raise StorageError("Backend_error", "MISSING_URI",
                               ["Please include a URI in the device-config"])
        return possible[0]

    # -- SR (SRImpl) ------------------------------------------------------------------

    def find(self, sr):
        """Attached_SRs.find: every VDI call on an SR not attached fails."""
        try:
            return self.attached[sr]
        except KeyError:
            raise StorageError("Sr_not_attached", None, [sr])

    def sr_attach(self, sr, device_config):
        """sr_attach_impl (l.976): SR.attach, then SR.stat of its answer (for
        the datasources), then Attached_SRs.add."""
        plugin_sr = self._volume("SR.attach", configuration=device_config)
        if not isinstance(plugin_sr, str):
            raise script_failed("Unexpected exception:Rpcmarshal: SR.attach returned %r"
                                % (plugin_sr,))
        _typed(check_sr_stat, self._volume("SR.stat", sr=plugin_sr))
        self.attached[sr] = plugin_sr
        return None

    def sr_detach(self, sr):
        """sr_detach_impl (l.1022): idempotent for SRs not attached."""
        plugin_sr = self.attached.get(sr)
        if plugin_sr is None:
            return None
        self._volume("SR.detach", sr=plugin_sr)
        del self.attached[sr]
        return None

    def sr_create(self, sr_uuid, name_label, description, device_config, size=0):
        """sr_create_impl (l.1140): the plugin's answer is the new device_config."""
        out = self._volume("SR.create", uuid=sr_uuid, configuration=device_config,
                           name=name_label, description=description)
        _typed(lambda c: _check_pairs(c, "configuration") or c, out)
        return out

    def sr_destroy(self, sr):
        self._volume("SR.destroy", sr=self.find(sr))

    def sr_stat(self, sr):
        return sr_info_of_stat(_typed(check_sr_stat, self._volume("SR.stat", sr=self.find(sr))))

    def sr_probe(self, device_config, sm_config=None):
        """sr_probe_impl (l.1065): every result is matched on (sr, complete,
        configuration["sr_uuid"]); one bad result fails the whole probe
        (Deferred.combine_errors) with SCRIPT_FAILED ["SR.probe"; text]."""
        response = _typed(check_probe_results,
                          self._volume("SR.probe", configuration=device_config))
        out, errors = [], []
        for r in response:
            uuid = r["configuration"].get("sr_uuid")
            sr, complete = r.get("sr"), r["complete"]

            def smapiv2(sr_info=None):
                return {"configuration": r["configuration"], "complete": complete,
                        "sr": sr_info, "extra_info": r["extra_info"]}
            if not complete and uuid is not None:
                errors.append("A configuration with a uuid cannot be incomplete: %s"
                              % json.dumps(r))
            elif sr is not None and complete and uuid is not None:
                out.append(smapiv2(sr_info_of_stat(sr)))
            elif sr is not None and uuid is None:
                errors.append("A configuration is not attachable without a uuid: %s"
                              % json.dumps(r))
            else:   # None, false, None | None, true, _
                out.append(smapiv2())
        if errors:
            raise StorageError("Backend_error", "SCRIPT_FAILED", ["SR.probe", "\n".join(errors)])
        return out

    def sr_scan2(self, sr):
        """sr_scan2_impl (l.1213): SR.stat first; anything but Healthy fails
        with Sr_unhealthy (Unreachable after 3 retries 1 s apart); then SR.ls
        minus the clone-on-boot transients, through vdi_of_volume."""
        plugin_sr = self.find(sr)
        times = 3
        while True:
            sr_info = sr_info_of_stat(_typed(check_sr_stat, self._volume("SR.stat", sr=plugin_sr)))
            h = sr_info["health"]
            if h == "Healthy":
                break
            if h == "Unreachable" and times > 0:
                time.sleep(1.0)
                times -= 1
                continue
            raise StorageError("Sr_unhealthy", None, [sr, h])
        vols = self._volume("SR.ls", sr=plugin_sr)
        _typed(lambda vs: [check_volume(v) for v in vs], vols)
        transients = set(v["keys"][CLONE_ON_BOOT] for v in vols if CLONE_ON_BOOT in v["keys"])
        return [vdi_of_volume(v) for v in vols if v["key"] not in transients], sr_info

    # -- VDI (VDIImpl) ---------------------------------------------------------------

    def _stat(self, plugin_sr, vdi):
        return _typed(check_volume, self._volume("Volume.stat", sr=plugin_sr, key=vdi))

    def _set(self, plugin_sr, vdi, k, v):
        return self._volume("Volume.set", sr=plugin_sr, key=vdi, k=k, v=v)

    def _unset(self, plugin_sr, vdi, k):
        return self._volume("Volume.unset", sr=plugin_sr, key=vdi, k=k)

    def _destroy(self, plugin_sr, vdi):
        return self._volume("Volume.destroy", sr=plugin_sr, key=vdi)

    def _clone(self, plugin_sr, vdi):
        return _typed(check_volume, self._volume("Volume.clone", sr=plugin_sr, key=vdi))

    def vdi_create(self, sr, vdi_info):
        """vdi_create_impl (l.1417): Volume.create, then Volume.set vdi-type
        when ty is not ""."""
        plugin_sr = self.find(sr)
        v = _typed(check_volume, self._volume(
            "Volume.create", sr=plugin_sr, name=vdi_info["name_label"],
            description=vdi_info.get("name_description", ""),
            size=vdi_info["virtual_size"], sharable=vdi_info.get("sharable", False)))
        ty = vdi_info.get("ty", "")
        if ty:
            self._set(plugin_sr, v["key"], VDI_TYPE, ty)
            v = dict(v, keys=dict(v["keys"], **{VDI_TYPE: ty}))
        return vdi_of_volume(v)

    def vdi_destroy(self, sr, vdi):
        """vdi_destroy_impl (l.1432), with its upstream bug: when the volume
        carries clone-on-boot, the ORIGINAL is destroyed twice and the
        temporary clone never."""
        plugin_sr = self.find(sr)
        response = self._stat(plugin_sr, vdi)
        if CLONE_ON_BOOT in response["keys"]:
            # "Destroy the temporary disk we made earlier": destroy ~dbg ~sr ~vdi
            self._destroy(plugin_sr, vdi)
        self._destroy(plugin_sr, vdi)

    def vdi_snapshot(self, sr, vdi_info):
        """vdi_snapshot_impl (l.1458): Volume.snapshot, then on the NEW key:
        snapshot_time, is_a_snapshot, snapshot_of, content_id, vdi-type; then
        the tags onto the SOURCE (upstream bug)."""
        plugin_sr = self.find(sr)
        vdi = vdi_info["vdi"]
        response = _typed(check_volume, self._volume("Volume.snapshot", sr=plugin_sr, key=vdi))
        now = now_rfc3339()
        new = response["key"]
        self._set(plugin_sr, new, SNAPSHOT_TIME, now)
        self._set(plugin_sr, new, IS_A_SNAPSHOT, "true")   # string_of_bool true
        self._set(plugin_sr, new, SNAPSHOT_OF, vdi)
        self._set(plugin_sr, new, CONTENT_ID, vdi_info.get("content_id", ""))
        self._set(plugin_sr, new, VDI_TYPE, vdi_info.get("ty", ""))
        for tag in vdi_info.get("tags", []):
            self._set(plugin_sr, vdi, TAGS_PREFIX + tag, tag)
        out = vdi_of_volume(response)
        out.update(snapshot_time=now, is_a_snapshot=True, snapshot_of=vdi)
        return out

    def vdi_clone(self, sr, vdi_info):
        """vdi_clone_impl (l.1502): Volume.clone, no key set."""
        return vdi_of_volume(self._clone(self.find(sr), vdi_info["vdi"]))

    def vdi_stat(self, sr, vdi):
        return vdi_of_volume(self._stat(self.find(sr), vdi))

    def vdi_introduce(self, sr, location):
        return vdi_of_volume(self._stat(self.find(sr), location))

    def vdi_resize(self, sr, vdi, new_size):
        plugin_sr = self.find(sr)
        self._volume("Volume.resize", sr=plugin_sr, key=vdi, new_size=new_size)
        return self._stat(plugin_sr, vdi)["virtual_size"]

    def vdi_set_persistent(self, sr, vdi, persistent):
        """vdi_set_persistent_impl: a no-op."""
        return None

    def vdi_enable_cbt(self, sr, vdi):
        self._volume("Volume.enable_cbt", sr=self.find(sr), key=vdi)

    def vdi_disable_cbt(self, sr, vdi):
        self._volume("Volume.disable_cbt", sr=self.find(sr), key=vdi)

    def vdi_list_changed_blocks(self, sr, vdi, vdi2):
        """vdi_list_changed_blocks_impl (l.1722): offset 0, length -1; only the
        bitmap is returned (the granularity is dropped)."""
        r = self._volume("Volume.list_changed_blocks", sr=self.find(sr), key=vdi, key2=vdi2,
                         offset=0, length=-1)
        _typed(lambda x: _need(isinstance(x, dict) and _is_int(x.get("granularity")) and
                               isinstance(x.get("bitmap"), str), "changed_blocks"), r)
        return r["bitmap"]

    def vdi_data_destroy(self, sr, vdi):
        """vdi_data_destroy_impl (l.1738): Volume.data_destroy, then
        Volume.set vdi-type cbt_metadata."""
        plugin_sr = self.find(sr)
        self._volume("Volume.data_destroy", sr=plugin_sr, key=vdi)
        self._set(plugin_sr, vdi, VDI_TYPE, "cbt_metadata")

    # -- DATA (attach/activate/...) ---------------------------------------------------

    def _redirected(self, plugin_sr, vdi):
        """Volume.stat, and if the volume carries clone-on-boot, Volume.stat of
        that temporary instead (vdi_attach_common, vdi_activate_common, ...)."""
        response = self._stat(plugin_sr, vdi)
        temporary = response["keys"].get(CLONE_ON_BOOT)
        if temporary is not None:
            response = self._stat(plugin_sr, temporary)
        return response

    def _data(self, script_dir, method, **args):
        return self._rpc(script_dir, method, **args)

    def vdi_attach3(self, dp, sr, vdi, vm, read_write):
        """vdi_attach3_impl (l.1558): read_write is ignored; the implementations
        pass through convert_implementation unchanged."""
        domain = domain_of(dp, vm)
        plugin_sr = self.find(sr)
        script_dir, _scheme, u = self.choose_datapath(self._redirected(plugin_sr, vdi))
        return _typed(check_backend, self._data(script_dir, "Datapath.attach", uri=u,
                                                domain=domain))

    def _activate_common(self, dp, sr, vdi, vm, readonly):
        """vdi_activate_common (l.1571)."""
        domain = domain_of(dp, vm)
        plugin_sr = self.find(sr)
        script_dir, _scheme, u = self.choose_datapath(self._redirected(plugin_sr, vdi))
        method = "Datapath.activate_readonly" if readonly else "Datapath.activate"
        self._data(script_dir, method, uri=u, domain=domain)

    def vdi_activate3(self, dp, sr, vdi, vm):
        return self._activate_common(dp, sr, vdi, vm, False)

    def vdi_activate_readonly(self, dp, sr, vdi, vm):
        return self._activate_common(dp, sr, vdi, vm, True)

    def vdi_deactivate(self, dp, sr, vdi, vm):
        """vdi_deactivate_impl (l.1604)."""
        domain = domain_of(dp, vm)
        plugin_sr = self.find(sr)
        script_dir, _scheme, u = self.choose_datapath(self._redirected(plugin_sr, vdi))
        self._data(script_dir, "Datapath.deactivate", uri=u, domain=domain)

    def vdi_detach(self, dp, sr, vdi, vm):
        """vdi_detach_impl (l.1626)."""
        domain = domain_of(dp, vm)
        plugin_sr = self.find(sr)
        script_dir, _scheme, u = self.choose_datapath(self._redirected(plugin_sr, vdi))
        self._data(script_dir, "Datapath.detach", uri=u, domain=domain)

    def dp_destroy2(self, dp, sr, vdi, vm, allow_leak=False):
        """DPImpl.dp_destroy2 (l.1806): deactivate then detach, unconditionally."""
        domain = domain_of(dp, vm)
        plugin_sr = self.find(sr)
        script_dir, _scheme, u = self.choose_datapath(self._redirected(plugin_sr, vdi))
        self._data(script_dir, "Datapath.deactivate", uri=u, domain=domain)
        self._data(script_dir, "Datapath.detach", uri=u, domain=domain)

    def vdi_epoch_begin(self, sr, vdi, vm, persistent):
        """vdi_epoch_begin_impl (l.1646): Volume.stat and choose_datapath
        ~persistent even for persistent disks; a NONPERSISTENT datapath gets
        Datapath.open(uri, persistent) whatever persistent is; otherwise, when
        not persistent, XSS makes the clone itself (Volume.clone + the
        clone-on-boot key, a leftover temporary destroyed first)."""
        plugin_sr = self.find(sr)
        response = self._stat(plugin_sr, vdi)
        script_dir, scheme, u = self.choose_datapath(response, persistent=persistent)
        if self.supports_feature(scheme, NONPERSISTENT):
            self._data(script_dir, "Datapath.open", uri=u, persistent=persistent)
        elif not persistent:
            temporary = response["keys"].get(CLONE_ON_BOOT)
            if temporary is not None:
                self._destroy(plugin_sr, temporary)
            clone = self._clone(plugin_sr, vdi)
            self._set(plugin_sr, vdi, CLONE_ON_BOOT, clone["key"])

    def vdi_epoch_end(self, sr, vdi, vm):
        """vdi_epoch_end_impl (l.1681): Datapath.close for a NONPERSISTENT
        datapath; else the clone-on-boot temporary is destroyed and the key
        unset."""
        plugin_sr = self.find(sr)
        response = self._stat(plugin_sr, vdi)
        script_dir, scheme, u = self.choose_datapath(response)
        if self.supports_feature(scheme, NONPERSISTENT):
            self._data(script_dir, "Datapath.close", uri=u)
        else:
            temporary = response["keys"].get(CLONE_ON_BOOT)
            if temporary is not None:
                self._destroy(plugin_sr, temporary)
                self._unset(plugin_sr, vdi, CLONE_ON_BOOT)


# -- storage_mux.ml -------------------------------------------------------------------

class StorageMux(object):
    """ocaml/xapi/storage_mux.ml: DP_info (what attach3 was told) and the RO
    decision of activate3."""

    def __init__(self, host):
        self.host = host
        self.dp_info = {}
        self._lock = threading.Lock()

    def sr_has_capability(self, sr, capability):
        """storage_mux_reg.ml sr_has_capability: the SR's registered features
        (the volume plugin's Query through XSS, parsed by smint.ml)."""
        return capability in parse_capabilities(self.host.xss.query["features"])

    def attach3(self, dp, sr, vdi, vm, read_write):
        with self._lock:
            self.dp_info[dp] = {"sr": sr, "vdi": vdi, "vm": vm, "read_write": read_write}
        return self.host.xss.vdi_attach3(dp, sr, vdi, vm, read_write)

    def activate3(self, dp, sr, vdi, vm):
        """activate3 (l.616): activate_readonly only when attached read-only
        AND the SR has VDI_ACTIVATE_READONLY; activate otherwise."""
        with self._lock:
            info = self.dp_info.get(dp)
        if info is None:
            raise StorageError("Internal_error", None, ["DP not found"])
        if not info["read_write"] and self.sr_has_capability(sr, "VDI_ACTIVATE_READONLY"):
            return self.host.xss.vdi_activate_readonly(dp, sr, vdi, vm)
        return self.host.xss.vdi_activate3(dp, sr, vdi, vm)

    def deactivate(self, dp, sr, vdi, vm):
        return self.host.xss.vdi_deactivate(dp, sr, vdi, vm)

    def dp_destroy(self, dp, sr, vdi, vm):
        self.host.xss.dp_destroy2(dp, sr, vdi, vm, False)
        with self._lock:
            self.dp_info.pop(dp, None)

    def epoch_begin(self, sr, vdi, vm, persistent):
        return self.host.xss.vdi_epoch_begin(sr, vdi, vm, persistent)

    def epoch_end(self, sr, vdi, vm):
        return self.host.xss.vdi_epoch_end(sr, vdi, vm)


# -- xenopsd: what the attach result becomes ------------------------------------------

def implementations_of_backend(implementations):
    """storage_interface.ml implementations_of_backend: a fold with cons, so
    each kind's list comes out REVERSED."""
    xendisks, blockdevs, files, nbds = [], [], [], []
    for kind, x in implementations:
        {"XenDisk": xendisks, "BlockDevice": blockdevs, "File": files,
         "Nbd": nbds}[kind].insert(0, x)
    return xendisks, blockdevs, files, nbds


def params_of_backend(backend):
    """xenops_server_xen.ml params_of_backend (l.305): a XenDisk is mandatory
    (xenstore backend-kind = its backend_type, extra as sm-data); params = the
    first BlockDevice path (after the reversal: the LAST one returned), else
    the first File path, else the Nbd uri with qemu-params = XenDisk.params.
    Returns (params, xenstore_data, extra_keys)."""
    xendisks, blockdevs, files, nbds = implementations_of_backend(backend["implementations"])
    if not xendisks:
        raise XenopsdError("Internal_error: Could not find XenDisk implementation: %s"
                           % json.dumps(backend))
    xd = xendisks[0]
    xenstore_data = dict(xd["extra"])
    # `List.mem_assoc backend_kind xenstore_data` looks the kind's VALUE up as a
    # key of extra (so an extra "backend-kind" does not win): as written upstream
    if xd["backend_type"] not in xenstore_data:
        xenstore_data = dict([("backend-kind", xd["backend_type"])] + list(xenstore_data.items()))
    if blockdevs:
        return blockdevs[0]["path"], xenstore_data, {}
    if files:
        return files[0]["path"], xenstore_data, {}
    if nbds:
        return nbds[0]["uri"], xenstore_data, {"qemu-params": xd["params"]}
    return "", xenstore_data, {"qemu-params": xd["params"]}


def block_hotplug(params):
    """ocaml/xenopsd/scripts/block `add`: params=$(readlink -f $params || echo
    $params); an nbd:unix: URI gives physical-device-path (the socket), anything
    else physical-device=$(stat --format=%t:%T $params), major:minor in hex.
    The model fails where the VBD could never connect: params missing, or not
    a block device (stat would give 0:0)."""
    m = re.search(r"nbd:unix:([^:]*)", params)
    if m:
        return {"physical-device-path": os.path.realpath(m.group(1))}
    real = os.path.realpath(params) if params else params
    try:
        st = os.stat(real)
    except OSError as e:
        raise XenopsdError("block hotplug: stat %s: %s (physical-device left empty)"
                           % (params, e.strerror))
    if not stat_mod.S_ISBLK(st.st_mode):
        raise XenopsdError("block hotplug: %s is not a block device (physical-device 0:0)"
                           % params)
    return {"physical-device": "%x:%x" % (os.major(st.st_rdev), os.minor(st.st_rdev))}


def parse_tapctl_list(text):
    rows = []
    for line in text.splitlines():
        row = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if row:
            rows.append(row)
    return rows


class ServedDisk(object):
    """The disk a backend serves: what the guest's (or dom0's) blkfront reads
    and writes, done here on the device the backend opened.  Both tapdisk
    (aio) and blkback bypass the page cache: O_DIRECT with page-aligned
    buffers; if the device refuses O_DIRECT, plain I/O with an fsync after
    each write."""

    def __init__(self, path, writable, backend, detail):
        self.path = path
        self.writable = writable
        self.backend = backend
        self.detail = detail
        flags = os.O_RDWR if writable else os.O_RDONLY
        self.direct = True
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0))
        except OSError as e:
            if e.errno != 22:   # EINVAL: no O_DIRECT here
                raise XenopsdError("%s backend cannot open %s %s: %s" % (
                    backend, path, "read-write" if writable else "read-only", e.strerror))
            self.direct = False
            self.fd = os.open(path, flags)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def read(self, offset, length):
        if not self.direct:
            return os.pread(self.fd, length, offset)
        n = -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
        buf = mmap.mmap(-1, n)
        try:
            got = os.preadv(self.fd, [buf], offset)
            return bytes(buf[:min(got, length)])
        finally:
            buf.close()

    def write(self, offset, data):
        if not self.writable:
            raise OSError(30, "read-only VBD")
        if not self.direct:
            n = os.pwrite(self.fd, data, offset)
            os.fsync(self.fd)
            return n
        buf = mmap.mmap(-1, -(-len(data) // mmap.PAGESIZE) * mmap.PAGESIZE)
        try:
            buf[:len(data)] = data
            view = memoryview(buf)[:len(data)]
            try:
                return os.pwritev(self.fd, [view], offset)
            finally:
                view.release()
        finally:
            buf.close()

    def digest(self, chunk=4 << 20):
        h = hashlib.sha256()
        off = 0
        while off < self.size:
            h.update(self.read(off, min(chunk, self.size - off)))
            off += chunk
        return h.hexdigest()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def backend_connect(host, xenstore):
    """The backend that picks up a VBD's xenstore directory.

    vbd (blkback): opens the block device named by physical-device
    (major:minor), read-only for mode r.
    vbd3 (tapback, blktap tapback/backend.c physical_device_changed): the
    major must be the tapdev major ("ignoring non-blktap2 physical device"),
    then find_tapdisk(minor) looks the minor up with libtapctl's
    tap_ctl_list; the tapdisk must have an image open (tap_ctl_info), and the
    VBD serves that image, read-only if the tapdisk opened it -R or the VBD
    mode is r.
    qdisk: nothing on XCP-ng 8.3 serves it."""
    kind = xenstore["backend-kind"]
    writable = xenstore["mode"] == "w"
    if kind == "qdisk":
        raise XenopsdError("no qdisk backend on XCP-ng 8.3 (qemuback disabled in "
                           "xcp-ng-xapi-storage.spec): params=%s" % xenstore["params"])
    if kind not in ("vbd", "vbd3"):
        raise XenopsdError("unknown backend-kind %r" % kind)
    pd = xenstore.get("physical-device")
    if not pd:
        raise XenopsdError("%s: no physical-device in xenstore (params=%s): the VBD never "
                           "connects" % (kind, xenstore["params"]))
    major, minor = (int(x, 16) for x in pd.split(":"))
    if kind == "vbd":
        try:
            with open("/sys/dev/block/%d:%d/uevent" % (major, minor)) as f:
                devname = dict(l.split("=", 1) for l in f.read().split() if "=" in l)["DEVNAME"]
        except (OSError, KeyError):
            raise XenopsdError("blkback: no block device %d:%d" % (major, minor))
        return ServedDisk("/dev/" + devname, writable, "blkback",
                          {"physical-device": pd, "device": "/dev/" + devname})
    import tapctl_model
    if host.tapctl is None:
        raise XenopsdError("vbd3: this host has no tapback (no blktap)")
    if major != tapctl_model.TAPDEV_MAJOR:
        raise XenopsdError("tapback: ignoring non-blktap2 physical device: %d (%s, params=%s); "
                           "it serves tapdevs of major %d only"
                           % (major, pd, xenstore["params"], tapctl_model.TAPDEV_MAJOR))
    rows = [r for r in tapctl_model.tap_ctl_list(host.tapctl_state())
            if r["minor"] == minor and r["pid"] is not None]
    if not rows:
        raise XenopsdError("tapback: error looking for tapdisk: no tapdisk serves minor %d"
                           % minor)
    tap = rows[0]
    try:
        info = tapctl_model.tap_ctl_info(tap["pid"], minor, host.tapctl_state())
    except tapctl_model.Fail as e:
        raise XenopsdError("tapback: tapdisk[%s] minor %d: tap_ctl_info: %s"
                           % (tap["pid"], minor, e))
    path = info["args"].partition(":")[2]
    return ServedDisk(path, writable and not info["readonly"], "tapback",
                      {"physical-device": pd, "tapdisk": tap, "image_ro": info["readonly"]})


class Xenopsd(object):
    """xenopsd for the VBDs of one host (xenops_server.ml atomics,
    xenops_server_xen.ml VBD.attach/activate/deactivate/detach, storage.ml)."""

    def __init__(self, host):
        self.host = host

    def dp(self, domid, device):
        """Storage.id_of: "vbd/<frontend domid>/<device>"."""
        return "vbd/%d/%s" % (domid, device)

    def epoch_begin(self, domid, vbd, persistent):
        self.host.mux.epoch_begin(vbd.sr, vbd.vdi, str(domid), persistent)

    def epoch_end(self, domid, vbd):
        self.host.mux.epoch_end(vbd.sr, vbd.vdi, str(domid))

    def plug(self, domid, vbd):
        """VBD_attach (Storage.attach: attach3 with read_write = mode RW) +
        VBD_activate (Storage.activate: activate3; then Device.Vbd.add with
        params_of_backend, the block script, the backend)."""
        dp = self.dp(domid, vbd.device)
        vm = str(domid)
        backend = self.host.mux.attach3(dp, vbd.sr, vbd.vdi, vm, vbd.mode == "RW")
        vbd.attach_info = backend
        self.host.mux.activate3(dp, vbd.sr, vbd.vdi, vm)
        params, xenstore_data, extra_keys = params_of_backend(backend)
        xs = dict(xenstore_data)
        xs.update(extra_keys)
        xs["params"] = params
        xs["mode"] = "w" if vbd.mode == "RW" else "r"
        vbd.xenstore = xs
        xs.update(block_hotplug(params))
        vbd.disk = backend_connect(self.host, xs)
        self.host.open_disks.append(vbd.disk)
        return vbd.disk

    def unplug(self, domid, vbd):
        """VBD_deactivate (Storage.deactivate) then VBD_detach
        (Storage.dp_destroy, whose exceptions are logged and ignored)."""
        if vbd.disk is not None:
            vbd.disk.close()
            vbd.disk = None
        dp = self.dp(domid, vbd.device)
        self.host.mux.deactivate(dp, vbd.sr, vbd.vdi, str(domid))
        self.dp_destroy(domid, vbd)

    def dp_destroy(self, domid, vbd):
        try:
            self.host.mux.dp_destroy(self.dp(domid, vbd.device), vbd.sr, vbd.vdi, str(domid))
        except StorageError as e:
            self.host.warnings.append("DP destroy returned unexpected exception: %s" % e)


# -- VMs, xapi-nbd, xapi ----------------------------------------------------------------

class VBD(object):
    def __init__(self, vdi, device="xvda", mode="RW"):
        """vdi: a Xapi VDI record; mode: "RW" or "RO"."""
        self.vdi_rec = vdi
        self.sr = vdi["sr"]
        self.vdi = vdi["location"]
        self.device = device
        self.mode = mode
        self.disk = None
        self.attach_info = None
        self.xenstore = None
        self.epoch = False
        self.plugged = False


class VM(object):
    """A guest: VM.start / clean shutdown as xapi and xenopsd run them."""

    def __init__(self, host, name, vbds):
        self.host = host
        self.name = name
        self.vbds = vbds
        self.domid = None

    def disk(self, device="xvda"):
        for v in self.vbds:
            if v.device == device:
                return v.disk
        raise KeyError(device)

    def start(self):
        """xapi: the VBD checks (xapi_vbd_helpers.ml), VBD.persistent =
        (VDI.on_boot = persist) (xapi_xenops.ml); xenopsd VM_start: per VBD,
        in parallel, VBD_set_active, VBD_epoch_begin (id, disk, persistent),
        vbd_plug (attach then activate).  A failure unplugs what was plugged
        and ends the epochs begun (the cleanup of a failed start)."""
        xapi = self.host.xapi
        for v in self.vbds:
            xapi.assert_attachable(v.vdi_rec, v.mode, system_domain=False)
        self.domid = self.host.new_domid()
        for v in self.vbds:
            xapi.vbd_attached(v.vdi_rec, v, True)

        def one(v):
            persistent = xapi.vdi(v.vdi_rec)["on_boot"] == "persist"
            self.host.xenopsd.epoch_begin(self.domid, v, persistent)
            v.epoch = True
            v.plugged = True
            self.host.xenopsd.plug(self.domid, v)
        try:
            _parallel(one, self.vbds)
        except BaseException:
            self._teardown(quiet=True)
            raise
        return self

    def shutdown(self):
        """VM_shutdown unplugs every VBD (deactivate, DP.destroy), then
        VM_poweroff runs VBD_epoch_end (xenops_server.ml l.1380-1400)."""
        self._teardown(quiet=False)

    def _teardown(self, quiet):
        errors = []

        def one(v):
            try:
                if v.plugged:
                    self.host.xenopsd.unplug(self.domid, v)
                    v.plugged = False
                if v.epoch:
                    self.host.xenopsd.epoch_end(self.domid, v)
                    v.epoch = False
            except Exception as e:
                errors.append(e)
            finally:
                self.host.xapi.vbd_attached(v.vdi_rec, v, False)
        _parallel(one, self.vbds)
        if errors and not quiet:
            raise errors[0]

    def crash(self):
        """The host dies under the VM: nothing is called; the disks simply go."""
        for v in self.vbds:
            if v.disk is not None:
                v.disk.close()
                v.disk = None
            v.plugged = v.epoch = False


def _parallel(fn, items):
    items = list(items)
    if len(items) <= 1:
        for i in items:
            fn(i)
        return
    with ThreadPoolExecutor(len(items)) as ex:
        for f in [ex.submit(fn, i) for i in items]:
            f.result()


class XapiNbd(object):
    """xapi-nbd (ocaml/nbd/src/main.ml with_attached_vdi, cleanup.ml): one RO
    dom0 VBD per NBD connection (VBD.create ~mode:`RO ~userdevice:autodetect,
    VBD.plug), served read-only from /dev/<VBD.device>; at most
    Consts.connection_limit = 16 connections."""

    def __init__(self, host):
        self.host = host
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self, vdi):
        with self._lock:
            if self.active >= NBD_CONNECTION_LIMIT:
                raise XapiError("NBD_CONNECTION_LIMIT", str(NBD_CONNECTION_LIMIT))
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            with self.host.dom0_vbd(vdi, "RO") as disk:
                yield disk
        finally:
            with self._lock:
                self.active -= 1


_VDI_TYPES = ("system", "user", "ephemeral", "suspend", "crashdump", "ha_statefile",
              "metadata", "redo_log", "rrd", "pvs_cache", "cbt_metadata")


class Xapi(object):
    """xapi of one host: its DB (SRs, PBDs, VDIs) and the calls of
    xapi_sr.ml, xapi_pbd.ml, xapi_vdi.ml that reach storage."""

    def __init__(self, host):
        self.host = host
        self.srs = {}        # SR uuid -> {"uuid", "name_label", "type", "pbd", "vdis": {location: rec}}
        self.attached = {}   # VDI location -> [(vbd, mode, system_domain)]
        self._lock = threading.Lock()

    # -- SR / PBD ---------------------------------------------------------------------

    def sr(self, sr_uuid):
        return self.srs[sr_uuid]

    def sr_introduce(self, name_label="", sr_uuid=None, name_description="", sm_type="zfs-ng"):
        sr_uuid = sr_uuid or str(uuid_mod.uuid4())
        self.srs[sr_uuid] = {"uuid": sr_uuid, "name_label": name_label,
                             "name_description": name_description, "type": sm_type,
                             "pbd": None, "vdis": {}, "physical_size": 0,
                             "physical_utilisation": 0, "virtual_allocation": 0}
        return sr_uuid

    def pbd_create(self, sr_uuid, device_config):
        """Xapi_pbd.create_common: for a v3 SR, no SRmaster key is added."""
        self.srs[sr_uuid]["pbd"] = {"device_config": dict(device_config),
                                    "currently_attached": False}

    def sr_create(self, device_config, name_label="", name_description="", physical_size=0):
        """xapi_sr.ml create (l.359): introduce, a PBD with the admin's
        device_config, Storage_access.create_sr (SR.create), the returned
        configuration stored as every PBD's device_config, then PBD.plug.
        No SR.attach happens between create and plug."""
        sr_uuid = self.sr_introduce(name_label, name_description=name_description)
        self.pbd_create(sr_uuid, device_config)
        try:
            new = self.host.xss.sr_create(sr_uuid, name_label, name_description,
                                          dict(device_config), physical_size)
        except Exception:
            del self.srs[sr_uuid]
            raise
        self.srs[sr_uuid]["pbd"]["device_config"] = dict(new)
        self.pbd_plug(sr_uuid)
        return sr_uuid

    def pbd_plug(self, sr_uuid):
        """xapi_pbd.ml plug (l.176): SR.attach with the stored device_config
        verbatim (XSS adds SR.stat)."""
        pbd = self.srs[sr_uuid]["pbd"]
        if pbd["currently_attached"]:
            return
        self.host.xss.sr_attach(sr_uuid, dict(pbd["device_config"]))
        pbd["currently_attached"] = True

    def pbd_unplug(self, sr_uuid):
        """xapi_pbd.ml unplug: refused while non-metadata VDIs are attached
        (vdi_in_use), then SR.detach."""
        sr = self.srs[sr_uuid]
        busy = [loc for loc in sr["vdis"] if self.attached.get(loc)]
        if busy:
            raise XapiError("VDI_IN_USE", *busy)
        self.host.xss.sr_detach(sr_uuid)
        sr["pbd"]["currently_attached"] = False

    def pbd_destroy(self, sr_uuid):
        sr = self.srs[sr_uuid]
        if sr["pbd"] and sr["pbd"]["currently_attached"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "PBD is currently attached")
        sr["pbd"] = None

    def sr_forget(self, sr_uuid):
        """SR.forget: the PBD must be unplugged; the SR and its VDIs leave the DB."""
        sr = self.srs[sr_uuid]
        if sr["pbd"] and sr["pbd"]["currently_attached"]:
            raise XapiError("SR_HAS_PBD", sr_uuid)
        del self.srs[sr_uuid]

    def sr_probe(self, device_config, sm_config=None):
        """xapi_sr.ml probe (l.247): for SMAPIv3, an XML <SRlist> of the
        results that carry an SR (size, name_label, name_description, UUID)."""
        results = self.host.xss.sr_probe(device_config, sm_config or {})
        root = ET.Element("SRlist")
        for r in results:
            s = r["sr"]
            if s is None:
                continue
            e = ET.SubElement(root, "SR")
            ET.SubElement(e, "size").text = str(s["total_space"])
            ET.SubElement(e, "name_label").text = s["name_label"]
            ET.SubElement(e, "name_description").text = s["name_description"]
            if s["sr_uuid"] is not None:
                ET.SubElement(e, "UUID").text = s["sr_uuid"]
        return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root).decode() + "\n"

    def sr_probe_ext(self, device_config, sm_config=None):
        """xapi_sr.ml probe_ext (l.304): every result as an API probe_result,
        health lowercased."""
        out = []
        for r in self.host.xss.sr_probe(device_config, sm_config or {}):
            s = r["sr"]
            out.append({
                "configuration": dict(r["configuration"]), "complete": r["complete"],
                "sr": None if s is None else {
                    "uuid": s["sr_uuid"], "name_label": s["name_label"],
                    "name_description": s["name_description"],
                    "total_space": s["total_space"], "free_space": s["free_space"],
                    "clustered": s["clustered"], "health": s["health"].lower()},
                "extra_info": dict(r["extra_info"])})
        return out

    def sr_scan(self, sr_uuid):
        """xapi_sr.ml scan (l.765): SR.scan2 then update_vdis; returns the
        SR's VDI records (by location)."""
        vdi_infos, sr_info = self.host.xss.sr_scan2(sr_uuid)
        sr = self.srs[sr_uuid]
        self.update_vdis(sr_uuid, vdi_infos)
        sr["virtual_allocation"] = sum(v["virtual_size"] for v in vdi_infos)
        sr["physical_size"] = sr_info["total_space"]
        sr["physical_utilisation"] = sr_info["total_space"] - sr_info["free_space"]
        return dict(sr["vdis"])

    def update_vdis(self, sr_uuid, vdi_infos, forget_missing=True):
        """xapi_sr.ml update_vdis (l.606): DB VDIs matched to volumes by
        location = volume key; forgotten when absent; created with uuid =
        Volume.uuid if it parses, on_boot=persist; fields kept in sync;
        snapshot_of resolved by location, then by uuid (CA-254515)."""
        sr = self.srs[sr_uuid]
        db = sr["vdis"]
        scan = {v["vdi"]: v for v in vdi_infos}
        if forget_missing:
            for loc in [l for l in db if l not in scan]:
                del db[loc]

        def find_vdi(loc):
            if loc in db:
                return db[loc]["uuid"]
            for s in self.srs.values():
                for rec in s["vdis"].values():
                    if rec["uuid"] == loc:
                        return rec["uuid"]
            return None
        for loc, vi in scan.items():
            if loc not in db:
                try:
                    u = str(uuid_mod.UUID(vi["uuid"])) if vi["uuid"] else None
                except ValueError:
                    u = None
                db[loc] = {"uuid": u or str(uuid_mod.uuid4()), "location": loc, "sr": sr_uuid,
                           "on_boot": "persist", "managed": True}
        for loc, vi in scan.items():
            rec = db[loc]
            rec.update({
                "name_label": vi["name_label"], "name_description": vi["name_description"],
                "type": vi["ty"] if vi["ty"] in _VDI_TYPES else "user",
                "is_a_snapshot": vi["is_a_snapshot"],
                "snapshot_time": of_iso8601(vi["snapshot_time"]),
                "snapshot_of": find_vdi(vi["snapshot_of"]) if vi["snapshot_of"] else None,
                "read_only": vi["read_only"], "virtual_size": vi["virtual_size"],
                "physical_utilisation": vi["physical_utilisation"],
                "is_tools_iso": vi["sm_config"].get("xs-tools") == "true",
                "cbt_enabled": vi["cbt_enabled"], "sharable": vi["sharable"],
                "content_id": vi["content_id"], "tags_smapi": list(vi["tags"]),
            })

    # -- VDI --------------------------------------------------------------------------

    def vdi(self, rec):
        """The current DB record of a VDI (by SR and location)."""
        return self.srs[rec["sr"]]["vdis"][rec["location"]]

    def _assert_plugged(self, sr_uuid):
        pbd = self.srs[sr_uuid]["pbd"]
        if not pbd or not pbd["currently_attached"]:
            raise XapiError("SR_NO_PBDS", sr_uuid)

    def _feature(self, capability):
        if capability not in parse_capabilities(self.host.xss.query["features"]):
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", capability)

    def vdi_create(self, sr_uuid, name_label, virtual_size, type="user", sharable=False,
                   name_description=""):
        """xapi_vdi.ml create (l.576): ty = the type's name; then the DB record
        from the returned vdi_info."""
        self._assert_plugged(sr_uuid)
        vi = self.host.xss.vdi_create(sr_uuid, {
            "name_label": name_label, "name_description": name_description, "ty": type,
            "virtual_size": virtual_size, "sharable": sharable})
        self.update_vdis(sr_uuid, [vi], forget_missing=False)
        return self.srs[sr_uuid]["vdis"][vi["vdi"]]

    def _vdi_info(self, rec):
        """Storage_smapiv1.vdi_info_of_vdi_rec: what xapi passes to VDI.snapshot/clone."""
        rec = self.vdi(rec)
        return {"vdi": rec["location"], "uuid": rec["uuid"],
                "content_id": rec.get("content_id", ""), "name_label": rec["name_label"],
                "name_description": rec["name_description"], "ty": rec["type"],
                "tags": list(rec.get("tags", [])), "sm_config": {}}

    def _snapshot_and_clone(self, call, rec):
        """xapi_vdi.ml snapshot_and_clone (l.813): the storage call, the new
        VDI in the DB, then name/description/type/sharable/on_boot/tags copied
        from the source."""
        self._assert_plugged(rec["sr"])
        src = self.vdi(rec)
        vi = call(rec["sr"], self._vdi_info(rec))
        self.update_vdis(rec["sr"], [vi], forget_missing=False)
        new = self.srs[rec["sr"]]["vdis"][vi["vdi"]]
        for k in ("name_label", "name_description", "type", "sharable", "on_boot"):
            new[k] = src[k]
        new["tags"] = list(src.get("tags", []))
        return new

    def vdi_snapshot(self, rec):
        """xapi_vdi.ml snapshot (l.854): then is_a_snapshot and snapshot_of set in the DB."""
        self._feature("VDI_SNAPSHOT")
        new = self._snapshot_and_clone(self.host.xss.vdi_snapshot, rec)
        new["is_a_snapshot"] = True
        new["snapshot_of"] = self.vdi(rec)["uuid"]
        return new

    def vdi_clone(self, rec):
        self._feature("VDI_CLONE")
        return self._snapshot_and_clone(self.host.xss.vdi_clone, rec)

    def vdi_destroy(self, rec):
        """xapi_vdi.ml destroy: no VBD may be attached; VDI.destroy; the DB record goes."""
        self._feature("VDI_DELETE")
        if self.attached.get(rec["location"]):
            raise XapiError("VDI_IN_USE", rec["location"], "destroy")
        self.host.xss.vdi_destroy(rec["sr"], rec["location"])
        self.srs[rec["sr"]]["vdis"].pop(rec["location"], None)

    def vdi_set_on_boot(self, rec, value):
        """xapi_vdi.ml set_on_boot (l.1288): needs VDI_RESET_ON_BOOT
        (feature_of_op); VDI.set_persistent (a no-op in XSS); the DB field."""
        self._feature("VDI_RESET_ON_BOOT")
        self.host.xss.vdi_set_persistent(rec["sr"], rec["location"], value == "persist")
        self.vdi(rec)["on_boot"] = value

    def vdi_enable_cbt(self, rec):
        self._feature("VDI_CONFIG_CBT")
        self.host.xss.vdi_enable_cbt(rec["sr"], rec["location"])
        self.vdi(rec)["cbt_enabled"] = True

    def vdi_list_changed_blocks(self, vdi_from, vdi_to):
        """VDI.list_changed_blocks: a base64 bitmap, one bit per 64 KiB
        (ocaml/idl/datamodel.ml: "Compare two VDIs in 64k block increments")."""
        self._feature("VDI_CONFIG_CBT")
        return self.host.xss.vdi_list_changed_blocks(vdi_from["sr"], vdi_from["location"],
                                                     vdi_to["location"])

    def vdi_data_destroy(self, rec):
        """xapi_vdi.ml _data_destroy: a CBT-enabled snapshot with no VBD
        attached; VDI.data_destroy; type cbt_metadata."""
        self._feature("VDI_CONFIG_CBT")
        r = self.vdi(rec)
        if not r["is_a_snapshot"] or not r.get("cbt_enabled"):
            raise XapiError("VDI_NO_CBT_METADATA" if not r.get("cbt_enabled")
                            else "VDI_IS_NOT_A_SNAPSHOT", rec["location"])
        if self.attached.get(rec["location"]):
            raise XapiError("VDI_IN_USE", rec["location"], "data_destroy")
        self.host.xss.vdi_data_destroy(rec["sr"], rec["location"])
        r["type"] = "cbt_metadata"

    # -- VBD bookkeeping (xapi_vbd_helpers.ml) -------------------------------------

    def assert_attachable(self, rec, mode, system_domain):
        """The VDI_IN_USE / VDI_READONLY checks of xapi_vbd_helpers.ml
        (valid_operations): a RW VBD on a read_only VDI is refused; unless the
        VDI is sharable or the VBD's VM is a system domain (dom0), a plug is
        refused when another non-system VBD is attached RW, or when this one
        is RW and any other non-system VBD is attached."""
        r = self.vdi(rec)
        others = [m for (_vbd, m, sysdom) in self.attached.get(rec["location"], [])
                  if not sysdom]
        need_write = mode == "RW"
        if not r["sharable"] and not system_domain and \
                ("RW" in others or (need_write and others)):
            raise XapiError("VDI_IN_USE", rec["location"])
        if need_write and r["read_only"]:
            raise XapiError("VDI_READONLY", rec["location"])

    def vbd_attached(self, rec, vbd, attached, system_domain=False):
        with self._lock:
            lst = self.attached.setdefault(rec["location"], [])
            lst[:] = [x for x in lst if x[0] is not vbd]
            if attached:
                lst.append((vbd, vbd.mode, system_domain))

    # -- vdi-export / vdi-copy ------------------------------------------------------

    def vdi_export_digest(self, rec):
        """vdi-export / vdi-copy of the source: Sm_fs_ops.with_block_attached_device
        with mode RO (a dom0 VBD, plugged like xapi-nbd's), the whole disk read."""
        with self.host.dom0_vbd(rec, "RO") as disk:
            return disk.digest()


class Host(object):
    """One XCP-ng host: its xapi-storage-script install root (symlinks into
    the checkout, as the README installs), the environment of the plugin
    processes, and the toolstack daemons."""

    def __init__(self, workdir, name="host1", tapctl=TAPCTL_MODEL, datapaths=DATAPATHS,
                 extra_env=None, netns=None):
        self.name = name
        self.netns = netns                # plugin processes run in it (tests/e2e/netns.py)
        self.workdir = os.path.join(workdir, name)
        self.storage_root = os.path.join(self.workdir, "xapi-storage-script")
        for d in ("volume", "datapath"):
            os.makedirs(os.path.join(self.storage_root, d), exist_ok=True)
        _link(PLUGIN_VOLUME, os.path.join(self.storage_root, "volume", VOLUME_QUEUE))
        for dp in datapaths:
            _link(os.path.join(PLUGIN_DATAPATH, dp),
                  os.path.join(self.storage_root, "datapath", dp))
        self.tapctl = tapctl              # the tap-ctl tapback uses (None: no blktap)
        self.extra_env = dict(extra_env or {})
        self.boot = 0
        self.warnings = []
        self.open_disks = []
        self.scripts = Scripts(self)
        self._domid = 0
        self._dom0_dev = 0
        self._lock = threading.Lock()
        self.xapi = Xapi(self)
        self._new_boot()

    def _new_boot(self):
        self.boot += 1
        self.run_dir = os.path.join(self.workdir, "run-boot%d" % self.boot)
        os.makedirs(self.run_dir, exist_ok=True)
        self.xss = Xss(self)
        self.mux = StorageMux(self)
        self.xenopsd = Xenopsd(self)
        self.nbd = XapiNbd(self)

    def tapctl_state(self):
        return os.path.join(self.run_dir, "tapctl", "state")

    def script_env(self):
        """The environment of every plugin process: this boot's /run for
        zfs-ng, tap-ctl (the stand-in, or "" for none), the tap-ctl
        stand-in's state; bytecode cached beside the run folder (the RPM installs .pyc,
        and guest-run.sh caches the checkout's the same way)."""
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(os.path.dirname(self.workdir), "pycache")
        env["ZFSNG_RUN_DIR"] = self.run_dir
        env["ZFSNG_NODE_RUN_DIR"] = self.run_dir
        env["ZFSNG_TAPCTL_STATE"] = self.tapctl_state()
        env["ZFSNG_TAP_CTL"] = self.tapctl or ""
        env.update(self.extra_env)
        return {k: v for k, v in env.items() if v is not None}    # None: unset

    def start(self):
        """xapi-storage-script starts: the plugins register (Plugin.Query)."""
        self.xss.register()
        return self

    def new_domid(self):
        with self._lock:
            self._domid += 1
            return self._domid

    @contextlib.contextmanager
    def dom0_vbd(self, rec, mode):
        """A dom0 VBD (userdevice autodetect) plugged by xapi through xenopsd
        (VBD.plug of a running VM: no epoch), unplugged after: the path of
        xapi-nbd connections, vdi-export and vdi-copy.  dom0 is a system
        domain: xapi's sharing check does not apply to it."""
        with self._lock:
            self._dom0_dev += 1
            n = self._dom0_dev
        device = "xvd" + _letters(n)
        self.xapi.assert_attachable(rec, mode, system_domain=True)
        vbd = VBD(rec, device=device, mode=mode)
        self.xapi.vbd_attached(rec, vbd, True, system_domain=True)
        try:
            try:
                vbd.plugged = True
                disk = self.xenopsd.plug(0, vbd)
            except BaseException:
                self.xenopsd.dp_destroy(0, vbd)
                raise
            try:
                yield disk
            finally:
                self.xenopsd.unplug(0, vbd)
        finally:
            self.xapi.vbd_attached(rec, vbd, False)

    def reboot(self):
        """The host crashed and boots again: /run is empty (zfs-ng's records,
        XSS's Attached_SRs in /var/run/nonpersistent, tapdisks), the daemons
        start afresh, xapi's DB stays; xapi plugs the PBDs at start."""
        self.kill_tapdisks()
        self.xapi.attached.clear()
        for sr in self.xapi.srs.values():
            if sr["pbd"]:
                sr["pbd"]["currently_attached"] = False
        self._new_boot()
        self.start()
        for sr_uuid, sr in list(self.xapi.srs.items()):
            if sr["pbd"]:
                self.xapi.pbd_plug(sr_uuid)

    def kill_tapdisks(self):
        """End the idle processes the tap-ctl stand-in spawned for this host
        (by the pids it recorded)."""
        import tapctl_model
        pids = tapctl_model.tapdisk_pids(self.tapctl_state())
        for pid in pids:
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    if not f.read().startswith(b"sleep"):
                        continue
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


def _letters(n):
    """userdevice autodetect in dom0: xvdb, xvdc, ... (xvda is dom0's own)."""
    s = ""
    while True:
        s = chr(ord("a") + n % 26) + s
        n = n // 26 - 1
        if n < 0:
            return s


def _link(target, path):
    if os.path.islink(path) and os.readlink(path) == target:
        return
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


# -- helpers for the tests ---------------------------------------------------------------

def bitmap_blocks(b64):
    """Set bits of a list_changed_blocks bitmap, MSB first in each byte."""
    raw = base64.b64decode(b64)
    return [i * 8 + k for i, byte in enumerate(bytearray(raw)) if byte
            for k in range(8) if byte & (0x80 >> k)]


def pattern(seed, size):
    return (("%08d" % seed).encode() * (size // 8 + 1))[:size]
