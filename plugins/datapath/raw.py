"""zfsng-raw: a local zvol for tapdisk.

With tap-ctl (an XCP-ng dom0), each attachment gets its own tapdisk as in
XCP-ng's tapdisk datapath (xcp-ng-xapi-storage plugins/datapath/tapdisk,
attach_internal): XenDisk vbd3 and BlockDevice both name the tapdev.  Both
matter: xenopsd writes the BlockDevice path, not XenDisk.params, as the VBD's
params (xenops_server_xen.ml, params_of_backend), the block hotplug script
turns it into physical-device (major:minor), and tapback serves the tapdisk
whose minor that is (blktap tapback/backend.c).  Handing it the zvol would
find the wrong tapdisk or none.  activate opens the zvol in the tapdisk (aio,
read-only with -R), deactivate closes it.

Without tap-ctl (not a Xen host: the test VM, a storage node) the documented
fallback is blkback on the zvol: XenDisk `vbd` with params = the zvol device,
plus BlockDevice.  Set ZFSNG_REQUIRE_TAPDISK=1 to make that a clear error.
"""

import os

from plugins import smapi, uri
from plugins.datapath import core, local, tapctl


def _require_tapdisk():
    return os.environ.get("ZFSNG_REQUIRE_TAPDISK", "") not in ("", "0")


class RawDatapath(local.LocalDatapath):
    scheme = uri.RAW

    def _tapctl(self):
        path = tapctl.find()
        if path is None:
            if _require_tapdisk():
                raise smapi.BackendError(
                    "Tapdisk_unavailable", "tap-ctl not found (is this a Xen dom0 with "
                    "blktap3?); unset ZFSNG_REQUIRE_TAPDISK to use blkback on the zvol")
            return None
        return tapctl.TapCtl(path)

    def _attach(self, u, st, domain, rec):
        writable, dev = self.device(u, st)
        rec["device"] = dev
        rec["writable"] = writable
        tc = self._tapctl()
        if tc is None:
            return [["XenDisk", {"backend_type": "vbd", "params": dev, "extra": {}}],
                    ["BlockDevice", {"path": dev}]]
        rec["tap"] = tc.create()
        tapdev = rec["tap"]["device"]
        return [["XenDisk", {"backend_type": "vbd3", "params": tapdev, "extra": {}}],
                ["BlockDevice", {"path": tapdev}]]

    def _still_attached(self, u, st, domain, rec):
        if not os.path.exists(rec.get("device", "")):
            return False
        tap = rec.get("tap")
        return tap is None or os.path.exists("/proc/%d" % tap["pid"])

    def _activate_local(self, u, st, domain, rec, mode):
        tap = rec.get("tap")
        if tap is not None:
            self._tapctl_or_fail().open(tap, rec["device"], readonly=(mode == core.RO))

    def _reactivate_local(self, u, st, domain, rec, mode):
        tap = rec.get("tap")
        if tap is not None:
            tc = self._tapctl_or_fail()
            if not tc.is_open(tap):
                tc.open(tap, rec["device"], readonly=(mode == core.RO))

    def _deactivate_local(self, u, st, domain, rec):
        tap = rec.get("tap")
        if tap is not None:
            self._tapctl_or_fail().close(tap)

    def _detach(self, u, st, domain, rec):
        tap = rec.get("tap")
        if tap is not None:
            path = tapctl.find()
            if path is not None:
                tapctl.TapCtl(path).destroy(tap)

    def _tapctl_or_fail(self):
        path = tapctl.find()
        if path is None:
            raise smapi.BackendError("Tapdisk_unavailable",
                                     "this attachment uses tapdisk but tap-ctl is gone")
        return tapctl.TapCtl(path)


def methods():
    return core.methods(RawDatapath(), "local zvols for tapdisk (blkback without tap-ctl)")
