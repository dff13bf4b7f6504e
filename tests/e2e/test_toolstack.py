"""zfs-ng driven by a model of XCP-ng 8.3's toolstack (tests/e2e/toolstack.py),
flow by flow, against real ZFS in the test VM:

    python3 tests/vm/vm.py pytest -x -q tests/e2e/test_toolstack.py

The tests run in file order and share one host and one SR (module fixture
`world`), as an admin's day would: create the SR, run VMs, snapshot, back up,
export, reset-on-boot, probe, move the SR to another host, share a disk.  Each
docstring names the xen-api / blktap / xapi-nbd sources its steps mirror (the
model's functions carry the file and function they follow; the sources are
quoted in /work/notes/toolstack.md).
"""

import base64
import hashlib
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_file_vdevs
from toolstack import (TAPCTL_MODEL, Host, StorageError, VBD, VM, XapiError, XenopsdError,
                       bitmap_blocks, implementations_of_backend, parse_capabilities,
                       parse_tapctl_list, pattern)

MiB = 1 << 20
KiB = 1 << 10
SIZE = 32 * MiB
CBT_BLOCK = 64 * KiB    # ocaml/idl/datamodel.ml: "Compare two VDIs in 64k block increments"


class Image(object):
    """What a disk must hold: the writes made to it, in order."""

    def __init__(self, size=SIZE):
        self.data = bytearray(size)

    def write(self, disk, off, data):
        disk.write(off, data)
        self.data[off:off + len(data)] = data

    def read(self, off, length):
        return bytes(self.data[off:off + length])

    def digest(self):
        return hashlib.sha256(self.data).hexdigest()

    def copy(self):
        im = Image(len(self.data))
        im.data[:] = self.data
        return im


def zpools():
    out = subprocess.run(["zpool", "list", "-H", "-o", "name"], stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def world():
    workdir = "/run/zfsng-toolstack-%s" % uuid.uuid4().hex[:8]
    pools_before = zpools()
    vdev = make_file_vdevs(1, 1 << 30)[0]
    w = {"workdir": workdir, "vdev": vdev, "hosts": [], "t0": time.time()}
    w["host"] = Host(workdir, "host1").start()
    w["hosts"].append(w["host"])
    yield w
    for h in w["hosts"]:
        h.kill_tapdisks()
        for d in getattr(h, "open_disks", []):
            d.close()
    for pool in zpools() - pools_before:
        subprocess.run(["zpool", "destroy", "-f", pool], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    for h in w["hosts"]:
        slow = sorted(h.scripts.log, key=lambda e: -e["seconds"])[:3]
        print("\n%s: %d plugin calls, slowest %s" % (
            h.name, len(h.scripts.log),
            ", ".join("%s %.1fs" % (e["method"], e["seconds"]) for e in slow)))
    os.unlink(vdev)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def per_test_calls(request, world):
    """With ZFSNG_TOOLSTACK_TRACE set, a line per test: its plugin calls and time."""
    n0 = sum(len(h.scripts.log) for h in world["hosts"])
    t0 = time.time()
    yield
    trace = os.environ.get("ZFSNG_TOOLSTACK_TRACE")
    if trace:
        import json
        n = sum(len(h.scripts.log) for h in world["hosts"]) - n0
        with open(trace, "a") as f:
            f.write(json.dumps({"test": request.node.name, "calls": n,
                                "seconds": round(time.time() - t0, 1)}) + "\n")


def need(world, *keys):
    missing = [k for k in keys if k not in world]
    if missing:
        pytest.skip("needs the earlier tests of this file (%s): run the file in order"
                    % ", ".join(missing))


def since(host, n, method=None):
    return [e for e in host.scripts.log[n:] if method is None or e["method"] == method]


def zvol_of(host, sr, key):
    """The zvol link of a volume (plugins/volume/README.md: POOL/zfs-ng/KEY);
    it exists while the volume is active."""
    pool = host.xapi.sr(sr)["pbd"]["device_config"]["pool"]
    return "/dev/zvol/%s/zfs-ng/%s" % (pool, key)


def tapctl_rows(host):
    out = subprocess.run([TAPCTL_MODEL, "list"], stdout=subprocess.PIPE, universal_newlines=True,
                         env=host.script_env(), check=True).stdout
    return parse_tapctl_list(out)


# -- a. sr-create, PBD.plug, VDI.create, sr-scan ------------------------------------------

def test_a_sr_create_plug_scan(world):
    """xe sr-create + vdi-create + sr-scan.

    Mirrors XSS main.ml QueryImpl.query_impl (the SM features xapi records)
    and Datapath_plugins.register; xapi_sr.ml create (introduce, PBD with the
    admin's device_config, storage_access.ml create_sr -> XSS sr_create_impl,
    the returned configuration stored as every PBD's device_config, then
    PBD.plug); xapi_pbd.ml plug (SR.attach with that device_config verbatim,
    XSS sr_attach_impl adds SR.stat); xapi_vdi.ml create -> XSS vdi_create_impl
    (Volume.create + Volume.set vdi-type); xapi_sr.ml scan -> XSS sr_scan2_impl
    (SR.stat health, SR.ls, vdi_of_volume) -> update_vdis."""
    host = world["host"]
    caps = parse_capabilities(host.xss.query["features"])
    assert host.xss.query["smapi_version"] == "SMAPIv3"
    assert caps.get("VDI_RESET_ON_BOOT") == 2, caps      # XSS adds it: VDI_CLONE is there
    for c in ("SR_CREATE", "SR_ATTACH", "SR_DETACH", "SR_SCAN", "SR_PROBE", "VDI_CREATE",
              "VDI_DELETE", "VDI_SNAPSHOT", "VDI_CLONE", "VDI_CONFIG_CBT", "VDI_ATTACH",
              "VDI_ACTIVATE"):
        assert c in caps, (c, host.xss.query["features"])
    # a read-only plug (snapshot VBDs, xapi-nbd, vdi-export) gets activate_readonly
    # only if the SR declares it (storage_mux.ml activate3)
    assert "VDI_ACTIVATE_READONLY" in caps, host.xss.query["features"]
    assert not host.xss.rejected, host.xss.rejected
    assert set(host.xss.datapaths) == {"zfsng-raw", "zfsng-nbd", "nvme+tcp", "nbd+tls"}

    n0 = len(host.scripts.log)
    admin_config = {"device": world["vdev"]}
    sr = host.xapi.sr_create(admin_config, name_label="toolstack SR",
                             name_description="made by xe sr-create")
    world["sr"] = sr
    calls = since(host, n0)
    assert [e["method"] for e in calls] == ["SR.create", "SR.attach", "SR.stat"], calls
    assert calls[0]["args"]["uuid"] == sr
    assert calls[0]["args"]["configuration"] == admin_config
    stored = host.xapi.sr(sr)["pbd"]["device_config"]
    assert calls[1]["args"]["configuration"] == stored     # verbatim, no SRmaster
    assert stored.get("sr_uuid") == sr, stored              # what sr-probe reads too
    assert host.xss.attached[sr] == calls[2]["args"]["sr"]

    n0 = len(host.scripts.log)
    vdi = host.xapi.vdi_create(sr, "disk a", SIZE, type="user",
                               name_description="a user disk")
    sets = since(host, n0, "Volume.set")
    assert [(e["args"]["key"], e["args"]["k"], e["args"]["v"]) for e in sets] == \
        [(vdi["location"], "vdi-type", "user")]
    vdis = host.xapi.sr_scan(sr)
    rec = vdis[vdi["location"]]
    assert rec["uuid"] == vdi["location"]          # zfs-ng: Volume.uuid = key, a UUID
    assert (rec["name_label"], rec["name_description"], rec["type"]) == \
        ("disk a", "a user disk", "user")
    assert rec["is_a_snapshot"] is False and rec["snapshot_of"] is None
    assert rec["snapshot_time"] == 0                 # "19700101T00:00:00Z"
    assert rec["read_only"] is False and rec["sharable"] is False
    assert rec["cbt_enabled"] is False
    assert rec["virtual_size"] >= SIZE
    assert rec["on_boot"] == "persist"
    s = host.xapi.sr(sr)
    assert s["physical_size"] > 0 and 0 <= s["physical_utilisation"] <= s["physical_size"]
    assert s["virtual_allocation"] >= SIZE
    world["vdi_a"] = rec


# -- b. VM start / stop on the raw datapath -------------------------------------------------

def test_b_vm_raw_datapath_tapdisk_and_blkback(world):
    """VM.start / VM.shutdown of a VM whose disk is on zfsng-raw, with blktap
    (the tap-ctl stand-in), then its restart on the host without blktap
    (ZFSNG_TAP_CTL=""): the data written through tapdisk is there.

    Mirrors xenops_server.ml VM_start (VBD_set_active, VBD_epoch_begin, vbd_plug
    = VBD_attach + VBD_activate) and VM_shutdown/VM_poweroff (deactivate,
    DP.destroy, VBD_epoch_end); storage.ml attach/activate/deactivate/dp_destroy;
    XSS vdi_epoch_begin_impl, vdi_attach3_impl, vdi_activate_common,
    vdi_deactivate_impl, dp_destroy2, vdi_epoch_end_impl, domain_of (a guest
    gets its domid); storage_mux.ml activate3; xenops_server_xen.ml
    params_of_backend (params = the BlockDevice path, not XenDisk.params);
    xenopsd scripts/block (stat %t:%T -> physical-device); blktap v3.55.5
    tapback/backend.c physical_device_changed + find_tapdisk (the tapdisk whose
    minor is physical-device's minor); blkback opening physical-device."""
    need(world, "sr")
    host, sr = world["host"], world["sr"]
    vdi = host.xapi.vdi_create(sr, "disk b", SIZE)
    image = Image()
    zvol = zvol_of(host, sr, vdi["location"])

    # -- with blktap: XenDisk vbd3 on a tapdev; tapback finds the tapdisk by minor
    assert host.tapctl == TAPCTL_MODEL
    vm = VM(host, "vm-b", [VBD(vdi, "xvda", "RW")])
    failure = None
    try:
        vm.start()
    except XenopsdError as e:
        failure = e
    try:
        vbd = vm.vbds[0]
        assert vbd.attach_info is not None, failure
        xendisks, blockdevs, _files, _nbds = implementations_of_backend(
            vbd.attach_info["implementations"])
        assert xendisks[0]["backend_type"] == "vbd3", vbd.attach_info
        tapdev = xendisks[0]["params"]
        assert re.match(r"^/dev/xen/blktap-2/tapdev\d+$", tapdev), tapdev
        # xenopsd hands the BlockDevice path to the backend (params_of_backend):
        # with vbd3 it must be the tapdev, as XCP-ng's own tapdisk datapath returns it
        assert blockdevs and blockdevs[0]["path"] == tapdev, (
            "XenDisk vbd3 params=%s but BlockDevice.path=%s: xenopsd writes that as "
            "params, tapback gets its physical-device (%s)" % (
                tapdev, blockdevs[0]["path"] if blockdevs else None, failure))
        assert failure is None, failure
        disk = vm.disk()
        assert disk.backend == "tapback"
        tap = disk.detail["tapdisk"]
        assert str(tap["minor"]) == tapdev[len("/dev/xen/blktap-2/tapdev"):]
        assert tap["type"] == "aio", tap
        assert os.path.realpath(tap["path"]) == os.path.realpath(zvol), tap
        assert disk.path == tap["path"]
        assert disk.detail["image_ro"] is False and disk.writable
        assert vbd.xenstore["params"] == tapdev and vbd.xenstore["backend-kind"] == "vbd3"
        image.write(disk, 0, pattern(1, 4 * KiB))
        image.write(disk, 1 * MiB, pattern(2, 1 * MiB))
        image.write(disk, SIZE - 64 * KiB, pattern(3, 64 * KiB))
        assert disk.read(1 * MiB, 1 * MiB) == image.read(1 * MiB, 1 * MiB)
        acts = [e for e in host.scripts.log if e["method"] == "Datapath.activate"
                and e["args"]["domain"] == str(vm.domid)]
        assert acts, "a guest's domain is its domid (XSS domain_of)"
    finally:
        if failure is None:
            vm.shutdown()
    assert not [r for r in tapctl_rows(host) if r.get("minor") == str(tap["minor"]) and "pid" in r]

    # -- the VM boots again on the host without blktap: XenDisk vbd, blkback opens
    # the zvol, and the data written through tapdisk is there
    host.tapctl = None
    try:
        vm = VM(host, "vm-b", [VBD(vdi, "xvda", "RW")]).start()
        try:
            vbd = vm.vbds[0]
            xendisks, blockdevs, _f, _n = implementations_of_backend(
                vbd.attach_info["implementations"])
            assert xendisks[0]["backend_type"] == "vbd"
            assert os.path.realpath(vbd.xenstore["params"]) == os.path.realpath(zvol)
            disk = vm.disk()
            assert disk.backend == "blkback"
            assert os.path.realpath(disk.path) == os.path.realpath(zvol)
            for off, n in ((0, 4 * KiB), (1 * MiB, 1 * MiB), (SIZE - 64 * KiB, 64 * KiB)):
                assert disk.read(off, n) == image.read(off, n), off
            image.write(disk, 8 * MiB, pattern(4, 256 * KiB))
        finally:
            vm.shutdown()
    finally:
        host.tapctl = TAPCTL_MODEL
    world["vdi_b"], world["image_b"] = vdi, image


# -- c. VDI.snapshot and VDI.clone ---------------------------------------------------------

def test_c_vdi_snapshot_and_clone(world):
    """xe vdi-snapshot, then vdi-clone of the snapshot, then sr-scan.

    Mirrors xapi_vdi.ml snapshot / snapshot_and_clone (vdi_info of the DB
    record) -> XSS vdi_snapshot_impl (Volume.snapshot, then Volume.set on the
    NEW key: snapshot_time = Clock.Date.to_rfc3339 now, is_a_snapshot "true",
    snapshot_of = the source key, content_id, vdi-type) and vdi_clone_impl
    (Volume.clone, no key set); XSS vdi_of_volume (bool_of_string of
    is_a_snapshot) and xapi_sr.ml update_vdis (Date.of_iso8601 of
    snapshot_time, snapshot_of resolved by location)."""
    need(world, "vdi_b")
    host, sr, src = world["host"], world["sr"], world["vdi_b"]
    n0 = len(host.scripts.log)
    t0 = time.time()
    snap = host.xapi.vdi_snapshot(src)
    calls = since(host, n0)
    assert [e["method"] for e in calls] == ["Volume.snapshot"] + ["Volume.set"] * 5
    new = snap["location"]
    sets = [(e["args"]["key"], e["args"]["k"], e["args"]["v"]) for e in calls[1:]]
    assert [s[:2] for s in sets] == [(new, "snapshot_time"), (new, "is_a_snapshot"),
                                     (new, "snapshot_of"), (new, "content_id"),
                                     (new, "vdi-type")]
    assert re.match(r"^\d{8}T\d{2}:\d{2}:\d{2}Z$", sets[0][2]), sets[0]
    assert sets[1][2] == "true" and sets[2][2] == src["location"]
    assert sets[3][2] == "" and sets[4][2] == "user"

    n0 = len(host.scripts.log)
    clone = host.xapi.vdi_clone(snap)
    assert [e["method"] for e in since(host, n0)] == ["Volume.clone"]
    vdis = host.xapi.sr_scan(sr)
    s, c = vdis[new], vdis[clone["location"]]
    assert s["is_a_snapshot"] is True
    assert s["snapshot_of"] == vdis[src["location"]]["uuid"]
    assert t0 - 5 <= s["snapshot_time"] <= time.time() + 5, s["snapshot_time"]
    assert s["read_only"] is True and s["type"] == "user"
    assert s["name_label"] == "disk b"
    # XSS sets no keys on a clone: it must not inherit the snapshot's
    assert c["is_a_snapshot"] is False and c["snapshot_of"] is None
    assert c["read_only"] is False and c["type"] == "user"
    assert c["snapshot_time"] == 0
    world["snap_c"], world["image_snap_c"] = s, world["image_b"].copy()
    world["clone_c"] = c


# -- d. Xen Orchestra incremental backup ----------------------------------------------------

def test_d_xen_orchestra_incremental_backup(world):
    """Xen Orchestra's delta backup with CBT and NBD: VDI.enable_cbt, writes
    by the running VM, VDI.snapshot S1, more writes, VDI.snapshot S2,
    VDI.list_changed_blocks(S1, S2), concurrent NBD connections (4 here)
    reading the changed blocks of S2, VDI.data_destroy(S1), VDI.destroy of S1
    and S2.

    Mirrors XSS vdi_enable_cbt_impl, vdi_snapshot_impl,
    vdi_list_changed_blocks_impl (offset 0, length -1, bitmap only),
    vdi_data_destroy_impl (+ vdi-type cbt_metadata), vdi_destroy_impl;
    xapi-nbd ocaml/nbd/src/main.ml with_attached_vdi (a RO dom0 VBD per
    connection, VBD.plug -> xenopsd attach3 read_write=false + activate3 ->
    storage_mux.ml activate3: activate_readonly when VDI_ACTIVATE_READONLY; XSS
    domain_of: u0_vbd_0_xvdX), lib/consts.ml connection_limit = 16."""
    need(world, "sr")
    host, sr = world["host"], world["sr"]
    vdi = host.xapi.vdi_create(sr, "disk d", SIZE)
    host.xapi.vdi_enable_cbt(vdi)
    image = Image()
    vm = VM(host, "vm-d", [VBD(vdi)]).start()
    try:
        disk = vm.disk()
        for off, n, seed in ((0, 64 * KiB, 10), (5 * MiB, 128 * KiB, 11),
                             (20 * MiB + 64 * KiB, 64 * KiB, 12)):
            image.write(disk, off, pattern(seed, n))
        s1 = host.xapi.vdi_snapshot(vdi)
        changed = ((1 * MiB, 64 * KiB, 20), (5 * MiB + 64 * KiB, 64 * KiB, 21),
                   (30 * MiB, 192 * KiB, 22), (31 * MiB + 4 * KiB, 4 * KiB, 23))
        for off, n, seed in changed:
            image.write(disk, off, pattern(seed, n))
        s2 = host.xapi.vdi_snapshot(vdi)
        image_s2 = image.copy()
        image.write(disk, 2 * MiB, pattern(30, 64 * KiB))     # after S2: not in it

        bitmap = host.xapi.vdi_list_changed_blocks(s1, s2)
        assert len(base64.b64decode(bitmap)) * 8 >= SIZE // CBT_BLOCK
        blocks = sorted(bitmap_blocks(bitmap))
        want = sorted(set(b for off, n, _ in changed
                          for b in range(off // CBT_BLOCK, (off + n - 1) // CBT_BLOCK + 1)))
        assert blocks == want, (blocks, want)

        # XO: N NBD connections to S2, the changed blocks spread over them
        n_conn = 4       # xapi-nbd allows 16 (lib/consts.ml); 4 keeps the CI run short
        barrier = threading.Barrier(n_conn, timeout=900)
        n0 = len(host.scripts.log)

        def connection(i):
            with host.nbd.connection(s2) as d:
                assert not d.writable
                barrier.wait()          # all 16 dom0 VBDs plugged at once
                for b in blocks[i::n_conn]:
                    got = d.read(b * CBT_BLOCK, CBT_BLOCK)
                    assert got == image_s2.read(b * CBT_BLOCK, CBT_BLOCK), (i, b)
                return d.backend
        with ThreadPoolExecutor(n_conn) as ex:
            backends = list(ex.map(connection, range(n_conn)))
        assert host.nbd.peak == n_conn
        ro = [e for e in since(host, n0, "Datapath.activate_readonly")
              if e["args"]["uri"].endswith(s2["location"])]
        assert len(ro) == n_conn
        domains = set(e["args"]["domain"] for e in ro)
        assert len(domains) == n_conn and all(re.match(r"^u0_vbd_0_xvd[a-z]+$", d)
                                              for d in domains), domains
        assert not since(host, n0, "Datapath.activate")
        assert set(backends) == {"tapback"}

        host.xapi.vdi_data_destroy(s1)
        vdis = host.xapi.sr_scan(sr)
        assert vdis[s1["location"]]["type"] == "cbt_metadata"
        # the next delta starts from the data-destroyed S1's metadata
        assert sorted(bitmap_blocks(host.xapi.vdi_list_changed_blocks(s1, s2))) == want
        host.xapi.vdi_destroy(s1)
        host.xapi.vdi_destroy(s2)
    finally:
        vm.shutdown()
    vdis = host.xapi.sr_scan(sr)
    assert s1["location"] not in vdis and s2["location"] not in vdis
    assert vdis[vdi["location"]]["cbt_enabled"] is True
    for loc in (world["vdi_a"]["location"], world.get("snap_c", {}).get("location")):
        assert loc is None or loc in vdis
    world["vdi_d"], world["image_d"] = vdis[vdi["location"]], image


# -- e. vdi-export / vdi-copy of a snapshot ----------------------------------------------------

def test_e_vdi_export_and_copy_of_a_snapshot(world):
    """xe vdi-export and vdi-copy of a snapshot, two at once: each plugs the
    snapshot read-only into dom0 and reads it whole.

    Mirrors xapi Sm_fs_ops.with_block_attached_device (mode RO) /
    storage_access.ml attach_and_activate (read_write = VBD mode RW, attach3
    then activate3); storage_mux.ml activate3 (activate_readonly with
    VDI_ACTIVATE_READONLY); XSS domain_of (dom0: "u0_" + dp, '/' and '-' ->
    '_', unique per dp so dom0 can plug the same VDI twice)."""
    need(world, "snap_c")
    host, snap = world["host"], world["snap_c"]
    want = world["image_snap_c"].digest()
    n0 = len(host.scripts.log)
    with ThreadPoolExecutor(2) as ex:
        digests = list(ex.map(host.xapi.vdi_export_digest, [snap, snap]))
    assert digests == [want, want]
    ro = [e for e in since(host, n0, "Datapath.activate_readonly")]
    assert len(ro) == 2 and len(set(e["args"]["domain"] for e in ro)) == 2
    assert all(e["args"]["domain"].startswith("u0_vbd_0_xvd") for e in ro)
    assert not since(host, n0, "Datapath.activate")


# -- f. on-boot=reset -------------------------------------------------------------------------

def test_f_on_boot_reset(world):
    """VDI.set_on_boot reset: a VM's writes are gone at its next start.

    Whatever zfsng-raw declares decides what XSS does (XSS
    vdi_epoch_begin_impl / vdi_epoch_end_impl, choose_datapath ~persistent):
    with NONPERSISTENT, Datapath.open(uri, false) at start and
    Datapath.close(uri) at stop; without it, XSS's clone-on-boot (Volume.clone
    + Volume.set clone-on-boot, attach/activate redirected to the clone by
    vdi_attach_common, Volume.destroy + Volume.unset at the end), the
    transient hidden from SR.scan (sr_scan2_impl).  xapi: xapi_vdi.ml
    set_on_boot (VDI_RESET_ON_BOOT), xapi_xenops.ml VBD.persistent = (on_boot
    = persist), xenops_server.ml VM_start / VM_poweroff epoch order.

    Then a reset-on-boot VM whose host crashed (epoch_end never ran), the
    host rebooted (/run empty, xapi plugs the PBD again), and VDI.destroy
    through XSS vdi_destroy_impl, which destroys the ORIGINAL twice when
    clone-on-boot is still set (the upstream bug, memo section 2.7): no error,
    no orphan in sr-scan."""
    need(world, "vdi_b")
    host, sr, vdi = world["host"], world["sr"], world["vdi_b"]
    image = world["image_b"]
    features = host.xss.datapaths["zfsng-raw"][1]["features"]
    nonpersistent = "NONPERSISTENT" in features
    host.xapi.vdi_set_on_boot(vdi, "reset")
    before = set(host.xapi.sr_scan(sr))

    n0 = len(host.scripts.log)
    vm = VM(host, "vm-f", [VBD(vdi)]).start()
    try:
        calls = since(host, n0)
        opens = [e for e in calls if e["method"] == "Datapath.open"]
        if nonpersistent:
            assert [(o["dir"], o["args"]["persistent"]) for o in opens] == [("zfsng-raw", False)]
            assert opens[0]["args"]["uri"].endswith("/" + vdi["location"])
            assert not [e for e in calls if e["method"] == "Volume.clone"]
        else:
            assert not opens
            clones = [e for e in calls if e["method"] == "Volume.clone"]
            assert [e["args"]["key"] for e in clones] == [vdi["location"]]
            sets = [e for e in calls if e["method"] == "Volume.set"]
            assert [(e["args"]["key"], e["args"]["k"]) for e in sets] == \
                [(vdi["location"], "clone-on-boot")]
            attaches = [e for e in calls if e["method"] == "Datapath.attach"]
            assert not attaches[0]["args"]["uri"].endswith("/" + vdi["location"])
        disk = vm.disk()
        assert disk.read(1 * MiB, 1 * MiB) == image.read(1 * MiB, 1 * MiB)
        disk.write(1 * MiB, pattern(99, 1 * MiB))
        assert disk.read(1 * MiB, 1 * MiB) == pattern(99, 1 * MiB)
        assert set(host.xapi.sr_scan(sr)) == before        # no transient shows
    finally:
        n0 = len(host.scripts.log)
        vm.shutdown()
    calls = since(host, n0)
    if nonpersistent:
        assert [e["dir"] for e in calls if e["method"] == "Datapath.close"] == ["zfsng-raw"]
    else:
        assert [e["method"] for e in calls[-3:]] == ["Volume.stat", "Volume.destroy",
                                                    "Volume.unset"]

    vm = VM(host, "vm-f", [VBD(vdi)]).start()
    try:
        disk = vm.disk()
        assert disk.read(1 * MiB, 1 * MiB) == image.read(1 * MiB, 1 * MiB), \
            "the writes of the last boot must be gone"
        assert disk.read(0, 4 * KiB) == image.read(0, 4 * KiB)
        assert set(host.xapi.sr_scan(sr)) == before
    except BaseException:
        vm.shutdown()
        raise

    # the host dies under the VM (VBD_epoch_end never runs) and boots again
    # (xapi plugs the PBD); then VDI.destroy: XSS vdi_destroy_impl calls
    # Volume.destroy of the ORIGINAL twice if clone-on-boot is still set
    disk.write(0, pattern(77, 64 * KiB))
    vm.crash()
    host.reboot()
    n0 = len(host.scripts.log)
    host.xapi.vdi_destroy(vdi)
    destroys = since(host, n0, "Volume.destroy")
    assert destroys and all(e["args"]["key"] == vdi["location"] for e in destroys)
    assert len(destroys) == (1 if nonpersistent else 2)
    after = set(host.xapi.sr_scan(sr))
    assert after == before - {vdi["location"]}, (sorted(after - before), sorted(before - after))
    world.pop("vdi_b")


def test_f_xss_clone_on_boot_when_no_nonpersistent(world):
    """on-boot=reset through a datapath without NONPERSISTENT (nvme+tcp): XSS
    resets the disk itself, and a crash before VBD_epoch_end leaves its
    clone-on-boot key for VDI.destroy.

    zfsng-raw and zfsng-nbd declare NONPERSISTENT, and choose_datapath
    ~persistent:false puts those first, so XSS makes clone-on-boot transients
    only on a host that has nvme+tcp alone installed (the SR lists nvme+tcp
    URIs once it has an nvme-node).  Mirrors XSS vdi_epoch_begin_impl
    (Volume.stat, choose_datapath, Volume.clone, Volume.set clone-on-boot),
    sr_scan2_impl (the transient hidden), vdi_destroy_impl (Volume.destroy of
    the ORIGINAL twice, never of the transient): no error, no orphan."""
    need(world, "sr")
    host, sr = world["host"], world["sr"]
    hostn = Host(world["workdir"], "host1-nvme-only", datapaths=("nvme+tcp",)).start()
    world["hosts"].append(hostn)
    assert set(hostn.xss.datapaths) == {"nvme+tcp"}
    assert not hostn.xss.supports_feature("nvme+tcp", "NONPERSISTENT")
    config = dict(host.xapi.sr(sr)["pbd"]["device_config"], **{"nvme-node": "127.0.0.1:4420"})
    hostn.xapi.sr_introduce("same SR", sr_uuid=sr)
    hostn.xapi.pbd_create(sr, config)
    hostn.xapi.pbd_plug(sr)          # never unplugged: that would export the pool
    vdi = hostn.xapi.vdi_create(sr, "disk f2", SIZE)
    hostn.xapi.vdi_set_on_boot(vdi, "reset")
    before = set(host.xapi.sr_scan(sr))
    assert vdi["location"] in before

    n0 = len(hostn.scripts.log)
    v = VBD(vdi)
    hostn.xenopsd.epoch_begin(hostn.new_domid(), v, persistent=False)
    calls = since(hostn, n0)
    assert [e["method"] for e in calls] == ["Volume.stat", "Volume.clone", "Volume.set"]
    assert calls[2]["args"]["k"] == "clone-on-boot"
    transient = calls[2]["args"]["v"]
    assert set(host.xapi.sr_scan(sr)) == before          # the transient is hidden
    # the host dies here: vbd_plug and VBD_epoch_end never come

    n0 = len(hostn.scripts.log)
    hostn.xapi.vdi_destroy(vdi)
    destroys = since(hostn, n0, "Volume.destroy")
    assert [e["args"]["key"] for e in destroys] == [vdi["location"]] * 2
    after = set(host.xapi.sr_scan(sr))
    assert transient not in after, "the clone-on-boot transient became a VDI"
    assert after == before - {vdi["location"]}, (sorted(after - before), sorted(before - after))


# -- g. sr-probe / sr-probe-ext -------------------------------------------------------------

def test_g_sr_probe_attached_and_exported(world):
    """xe sr-probe and sr-probe-ext type=zfs-ng device-config:device=...
    of the attached SR, then of the exported one (after PBD.unplug = SR.detach,
    a zpool export); the exported SR's probe configuration plugs as a new PBD.

    Mirrors XSS sr_probe_impl (the match on (sr, complete,
    configuration["sr_uuid"]), combine_errors: one bad result fails all);
    xapi_sr.ml probe (XML <SRlist> of the results that carry an SR) and
    probe_ext; xapi_pbd.ml unplug/plug."""
    need(world, "sr")
    host, sr = world["host"], world["sr"]
    probe_config = {"device": world["vdev"]}
    root = ET.fromstring(host.xapi.sr_probe(probe_config))
    srs = root.findall("SR")
    assert len(srs) == 1, ET.tostring(root)
    assert srs[0].findtext("UUID") == sr
    assert srs[0].findtext("name_label") == "toolstack SR"
    assert int(srs[0].findtext("size")) > 0
    ext = host.xapi.sr_probe_ext(probe_config)
    assert len(ext) == 1 and ext[0]["complete"] is True
    assert ext[0]["sr"]["uuid"] == sr and ext[0]["sr"]["health"] == "healthy"
    assert ext[0]["configuration"]["sr_uuid"] == sr

    host.xapi.pbd_unplug(sr)
    root = ET.fromstring(host.xapi.sr_probe(probe_config))
    assert root.findall("SR") == []          # xe sr-probe lists only SRs with a stat
    ext = host.xapi.sr_probe_ext(probe_config)
    assert len(ext) == 1 and ext[0]["complete"] is True and ext[0]["sr"] is None, ext
    config = ext[0]["configuration"]
    assert config["sr_uuid"] == sr
    host.xapi.pbd_destroy(sr)
    host.xapi.pbd_create(sr, config)
    host.xapi.pbd_plug(sr)
    assert host.scripts.calls("SR.attach")[-1]["args"]["configuration"] == config
    assert world["vdi_a"]["location"] in host.xapi.sr_scan(sr)


# -- h. the SR moved to another host ------------------------------------------------------

def test_h_sr_moved_to_a_new_host(world):
    """PBD.unplug + SR.forget on host 1; on host 2 (its own xapi DB,
    xapi-storage-script, /run): sr-probe-ext on the devices, sr-introduce
    (a new SR uuid), pbd-create with the probed configuration, pbd-plug,
    sr-scan finds every VDI with its name and snapshot relations; a VM starts.

    Mirrors xapi_pbd.ml unplug/plug, xapi_sr.ml forget, introduce, probe_ext,
    scan/update_vdis (VDIs matched by location, uuid = Volume.uuid, snapshot_of
    resolved by location); XSS sr_attach_impl, sr_scan2_impl."""
    need(world, "sr", "vdi_d")
    host1, sr1 = world["host"], world["sr"]
    before = host1.xapi.sr_scan(sr1)
    by_uuid = {r["uuid"]: loc for loc, r in before.items()}
    host1.xapi.pbd_unplug(sr1)
    host1.xapi.sr_forget(sr1)

    host2 = Host(world["workdir"], "host2").start()
    world["hosts"].append(host2)
    ext = host2.xapi.sr_probe_ext({"device": world["vdev"]})
    assert len(ext) == 1 and ext[0]["sr"] is None, ext
    sr2 = host2.xapi.sr_introduce("moved SR")
    assert sr2 != sr1
    host2.xapi.pbd_create(sr2, ext[0]["configuration"])
    host2.xapi.pbd_plug(sr2)
    after = host2.xapi.sr_scan(sr2)
    assert set(after) == set(before)
    by_uuid2 = {r["uuid"]: loc for loc, r in after.items()}
    for loc, r in before.items():
        a = after[loc]
        for k in ("uuid", "name_label", "name_description", "type", "is_a_snapshot",
                  "snapshot_time", "read_only", "virtual_size", "cbt_enabled"):
            assert a[k] == r[k], (loc, k, a[k], r[k])
        parent = by_uuid.get(r["snapshot_of"]) if r["snapshot_of"] else None
        parent2 = by_uuid2.get(a["snapshot_of"]) if a["snapshot_of"] else None
        assert parent == parent2, (loc, parent, parent2)
    if "snap_c" in world:
        assert after[world["snap_c"]["location"]]["is_a_snapshot"] is True

    vdi = after[world["vdi_d"]["location"]]
    vm = VM(host2, "vm-h", [VBD(vdi)]).start()
    try:
        want = world["image_d"]
        assert vm.disk().read(0, 64 * KiB) == want.read(0, 64 * KiB)
        assert vm.disk().read(30 * MiB, 192 * KiB) == want.read(30 * MiB, 192 * KiB)
    finally:
        vm.shutdown()
    world["host"], world["sr"], world["vdi_d"] = host2, sr2, vdi


# -- i. one disk, several domains ------------------------------------------------------------

def test_i_readonly_by_two_guests_readwrite_by_one(world):
    """A VDI plugged read-only (VBD mode RO) by two running guests at once;
    then read-write by one guest, when a second RW plug is refused: by xapi
    itself for a guest (xapi_vbd_helpers.ml: VDI_IN_USE), and by zfs-ng for a
    dom0 VBD, which xapi does not check (system domain): Datapath.activate ->
    Volume_in_use, as XSS backend_backtrace_error returns it.

    Mirrors xenops_server_xen.ml VBD.attach (read_write = mode RW),
    storage_mux.ml activate3, XSS vdi_activate_common and dp_destroy2 (the
    cleanup of the failed plug must leave the RW guest's activation alone)."""
    need(world, "vdi_d")
    host, vdi, image = world["host"], world["vdi_d"], world["image_d"]
    n0 = len(host.scripts.log)
    a = VM(host, "ro-a", [VBD(vdi, "xvdb", "RO")])
    b = VM(host, "ro-b", [VBD(vdi, "xvdb", "RO")])
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda vm: vm.start(), [a, b]))
    try:
        for vm in (a, b):
            d = vm.disk("xvdb")
            assert not d.writable
            assert d.read(30 * MiB, 192 * KiB) == image.read(30 * MiB, 192 * KiB)
        ro = since(host, n0, "Datapath.activate_readonly")
        assert sorted(e["args"]["domain"] for e in ro) == sorted([str(a.domid), str(b.domid)])
        assert not since(host, n0, "Datapath.activate")
    finally:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda vm: vm.shutdown(), [a, b]))

    c = VM(host, "rw-c", [VBD(vdi, "xvda", "RW")]).start()
    try:
        n1 = len(host.scripts.log)
        with pytest.raises(XapiError) as e:
            VM(host, "rw-d", [VBD(vdi, "xvda", "RW")]).start()
        assert e.value.code == "VDI_IN_USE"
        with pytest.raises(XapiError) as e:
            VM(host, "ro-e", [VBD(vdi, "xvdb", "RO")]).start()
        assert e.value.code == "VDI_IN_USE"
        assert len(host.scripts.log) == n1          # xapi refused: no storage call
        with pytest.raises(StorageError) as e:
            with host.dom0_vbd(vdi, "RW"):
                pass
        assert e.value.name == "Backend_error_with_backtrace"
        assert e.value.code == "SR_BACKEND_FAILURE" and e.value.smapi == "Volume_in_use", \
            e.value
        disk = c.disk()
        image.write(disk, 12 * MiB, pattern(55, 64 * KiB))
        assert disk.read(12 * MiB, 64 * KiB) == pattern(55, 64 * KiB)
    finally:
        c.shutdown()
