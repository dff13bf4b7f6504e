"""Guest side of tests/vm/test_power_cut.py: one call per boot of the test VM.

    power_cut_guest.py boot --disk DEV --pool P --round R [--verify JSON] [--write]
    power_cut_guest.py writer --dev PATH --name NAME --round R [--no-sync]

`boot` first (with --verify) imports the pool the previous boot left behind
when QEMU was killed, and checks round R-1's volumes against the
acknowledgements the host saw; it prints one `RESULT {json}` line.  Then (with
--write) it makes round R's volumes and writes to them until the host kills
QEMU: `local` is a zvol written directly, `nvme` a zvol served by our NVMe/TCP
target (`sr_tools target serve`) and written through the kernel initiator over
loopback (/dev/nvmeXnY, a volatile write cache: fsync sends an NVMe Flush),
`ctl` a zvol written without any fsync (the control: its acknowledgements are
lies, so a cut that bites loses some of them).  Without --write it exports the
pool and exits.

A writer writes 4 KiB records, sequence s = 1, 2, ... at block b(s) (a
deterministic pseudo-random function of device, round and s over --blocks
blocks), with O_DIRECT, one at a time; after every --every writes it calls
fdatasync() and only THEN writes `ACK NAME s` to stdout (the run folder's
output file on virtio-9p: the line is in the host's file when write()
returns).  A record: magic, device, round, s, b, random filler, CRC32.
"""

import argparse
import glob
import json
import mmap
import os
import re
import struct
import subprocess
import sys
import time
import uuid
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))

BS = 4096
MAGIC = b"ZNGPCUT1"
HEAD = struct.Struct("<8sIIQQ")          # magic, device, round, seq, block
DEVICES = {"local": 1, "nvme": 2, "ctl": 3}
PORT = 4420
SOCK = "/run/zfs-ng/power-cut.sock"
MASK = (1 << 64) - 1


def out(line):
    """One line to stdout in one write() (the writers share the file)."""
    os.write(1, (line + "\n").encode())


def sh(*argv):
    p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if p.returncode != 0:
        raise SystemExit("%s failed (%d): %s" % (" ".join(argv), p.returncode, p.stdout))
    return p.stdout


def block_of(dev, rnd, s, blocks):
    """b(s): splitmix64 of (device, round, s), mod the block count."""
    z = (dev << 48 ^ rnd << 32 ^ s) * 0x9E3779B97F4A7C15 & MASK
    z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9 & MASK
    z = (z ^ z >> 27) * 0x94D049BB133111EB & MASK
    return (z ^ z >> 31) % blocks


def record(dev, rnd, s, b):
    body = HEAD.pack(MAGIC, dev, rnd, s, b) + os.urandom(BS - HEAD.size - 4)
    return body + struct.pack("<I", zlib.crc32(body))


def parse(buf):
    """(device, round, seq, block) of a valid record, "zero" or None (invalid)."""
    if buf.count(0) == BS:
        return "zero"
    body, crc = buf[:-4], struct.unpack("<I", buf[-4:])[0]
    if zlib.crc32(body) != crc or body[:8] != MAGIC:
        return None
    return HEAD.unpack(body[:HEAD.size])[1:]


def find_namespace(ns_uuid, timeout=60):
    """/dev node of the namespace with this UUID: the multipath head nvmeXnY,
    never a hidden per-path nvmeXcYnZ node."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in glob.glob("/sys/class/block/nvme*n*/uuid"):
            name = path.split("/")[-2]
            try:
                if re.match(r"^nvme\d+n\d+$", name) and open(path).read().strip() == ns_uuid \
                        and os.path.exists("/dev/" + name):
                    return "/dev/" + name
            except OSError:
                pass
        time.sleep(0.2)
    raise SystemExit("no NVMe namespace with uuid %s" % ns_uuid)


def wait_path(path, timeout=60):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise SystemExit("%s did not appear" % path)
        subprocess.run(["udevadm", "settle", "--timeout=5"])
        time.sleep(0.2)
    return path


# -- writer -------------------------------------------------------------------

def writer(a):
    dev = DEVICES[a.name]
    fd = os.open(a.dev, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BS)                  # page-aligned, as O_DIRECT wants
    deadline = time.time() + a.max_seconds
    s = 0
    while time.time() < deadline:
        for _ in range(a.every):
            s += 1
            b = block_of(dev, a.round, s, a.blocks)
            buf[:] = record(dev, a.round, s, b)
            if os.pwrite(fd, buf, b * BS) != BS:
                raise SystemExit("short write")
        if not a.no_sync:
            os.fdatasync(fd)
        out("ACK %s %d" % (a.name, s))
    out("WRITER-EXPIRED %s %d (the host should have cut the power)" % (a.name, s))
    return 1


# -- verify -------------------------------------------------------------------

def check_volume(path, dev, rnd, blocks, acked, inflight):
    """Check one volume against `acked` (every write <= acked was fsynced).

    For each block b, need = the newest s <= acked with b(s) = b (0: none).
    The block must hold a valid record of (dev, rnd, b) with seq >= need; a
    newer one may only come from writes the host did not see acknowledged,
    s in (acked, acked + inflight] (a writer issues at most `inflight` writes
    after its last visible ACK).  An invalid or zero block is lost if need > 0,
    tolerated only where such an in-flight write went (a torn write)."""
    need = [0] * blocks
    for s in range(1, acked + 1):
        need[block_of(dev, rnd, s, blocks)] = s
    maybe = {}
    for s in range(acked + 1, acked + inflight + 1):
        maybe.setdefault(block_of(dev, rnd, s, blocks), []).append(s)
    r = {"acked": acked, "blocks_with_acked_write": sum(1 for n in need if n),
         "lost": 0, "stale": 0, "newer_unacked": 0, "torn_in_flight": 0, "invalid": 0,
         "bad": []}
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    try:
        for base in range(0, blocks, len(buf) // BS):
            n = min(len(buf) // BS, blocks - base)
            got = os.preadv(fd, [memoryview(buf)[:n * BS]], base * BS)
            assert got == n * BS, (path, base, got)
            for i in range(n):
                b = base + i
                rec = parse(buf[i * BS:(i + 1) * BS])
                if rec == "zero" or rec is None:
                    if need[b]:
                        r["lost"] += 1
                        r["bad"].append([b, need[b], "zero" if rec else "invalid"])
                    elif rec is None:
                        if b in maybe:
                            r["torn_in_flight"] += 1
                        else:
                            r["invalid"] += 1
                            r["bad"].append([b, 0, "invalid"])
                    continue
                d, rd, seq, blk = rec
                ok_seq = seq == need[b] or (seq in maybe.get(b, ()))
                if (d, rd, blk) != (dev, rnd, b) or not ok_seq:
                    if (d, rd, blk) == (dev, rnd, b) and seq < need[b] \
                            and block_of(dev, rnd, seq, blocks) == b:
                        r["lost"] += 1          # an older acked write: the newest is gone
                        r["stale"] += 1
                        r["bad"].append([b, need[b], "stale seq %d" % seq])
                    else:
                        r["invalid"] += 1
                        r["bad"].append([b, need[b], "foreign %r" % (rec,)])
                elif seq > need[b]:
                    r["newer_unacked"] += 1
    finally:
        os.close(fd)
    r["bad"] = r["bad"][:20]
    return r


def verify(a, spec):
    t0 = time.time()
    sh("zpool", "import", "-f", "-d", os.path.dirname(a.disk), a.pool)
    import_s = time.time() - t0
    result = {"round": spec["round"], "import_s": round(import_s, 2), "devices": {}}
    for name, acked in sorted(spec["acks"].items()):
        path = wait_path("/dev/zvol/%s/r%d-%s" % (a.pool, spec["round"], name))
        result["devices"][name] = check_volume(path, DEVICES[name], spec["round"],
                                               spec["blocks"], acked, spec["every"])
    result["verify_s"] = round(time.time() - t0 - import_s, 2)
    out("RESULT " + json.dumps(result, sort_keys=True))
    for name in spec["acks"]:
        sh("zfs", "destroy", "%s/r%d-%s" % (a.pool, spec["round"], name))


# -- write --------------------------------------------------------------------

def start_target():
    os.makedirs(os.path.dirname(SOCK), exist_ok=True)
    log = open("/run/power-cut-target.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sr_tools", "target", "serve", "--listen",
         "127.0.0.1:%d" % PORT, "--state", "/run/power-cut-target.db", "--socket", SOCK],
        cwd=ROOT, stdout=log, stderr=log)
    deadline = time.time() + 120
    while not os.path.exists(SOCK):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("target did not start:\n"
                             + open("/run/power-cut-target.log").read())
        time.sleep(0.2)
    return proc


def write(a):
    from kernel_nvmet import connect
    vols = {}
    for name in ("local", "nvme", "ctl"):
        ds = "%s/r%d-%s" % (a.pool, a.round, name)
        sh("zfs", "create", "-s", "-V", str(2 * a.blocks * BS), "-o", "volblocksize=16K", ds)
        vols[name] = wait_path("/dev/zvol/" + ds)
    start_target()
    nqn = "nqn.2014-08.org.zfs-ng:power-cut:r%d" % a.round
    ns_uuid = str(uuid.uuid4())
    hostnqn = open("/etc/nvme/hostnqn").read().strip()
    sh(sys.executable, "-m", "sr_tools", "target", "add", "--socket", SOCK, nqn,
       vols["nvme"], "--uuid", ns_uuid, "--allow", hostnqn)
    connect(nqn, PORT)
    ns = find_namespace(ns_uuid)
    wc = open("/sys/block/%s/queue/write_cache" % os.path.basename(ns)).read().strip()
    if wc != "write back":
        raise SystemExit("%s: write_cache is %r: fsync would send no Flush" % (ns, wc))
    paths = {"local": vols["local"], "nvme": ns, "ctl": vols["ctl"]}
    procs = []
    for name, path in sorted(paths.items()):
        argv = [sys.executable, os.path.abspath(__file__), "writer", "--dev", path,
                "--name", name, "--round", str(a.round), "--blocks", str(a.blocks),
                "--every", str(a.every), "--max-seconds", str(a.max_seconds)]
        if name == "ctl":
            argv.append("--no-sync")
        procs.append(subprocess.Popen(argv))
    out("WRITING " + json.dumps({"round": a.round, "paths": paths, "write_cache": wc}))
    for p in procs:
        p.wait()
    return 1          # the writers gave up before the cut came


def boot(a):
    if a.verify:
        verify(a, json.loads(a.verify))
    elif a.write:
        disk = os.path.realpath(wait_path(a.disk))
        sh("zpool", "create", "-f", "-o", "ashift=12", "-O", "compression=lz4", a.pool, disk)
    if a.write:
        return write(a)
    sh("zpool", "export", a.pool)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("boot")
    b.add_argument("--disk", required=True)
    b.add_argument("--pool", required=True)
    b.add_argument("--verify", help="JSON: round, acks {name: s}, blocks, every")
    b.add_argument("--write", action="store_true")
    w = sub.add_parser("writer")
    w.add_argument("--dev", required=True)
    w.add_argument("--name", required=True, choices=sorted(DEVICES))
    w.add_argument("--no-sync", action="store_true")
    for s in (b, w):
        s.add_argument("--round", type=int, required=True)
        s.add_argument("--blocks", type=int, default=4096)
        s.add_argument("--every", type=int, default=8)
        s.add_argument("--max-seconds", type=int, default=900)
    a = p.parse_args()
    return writer(a) if a.cmd == "writer" else boot(a)


if __name__ == "__main__":
    sys.exit(main())
