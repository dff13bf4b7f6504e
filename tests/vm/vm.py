#!/usr/bin/env python3
"""Boot the zfs-ng test VM and run one command inside it.

    vm.py image                 build (or reuse) the cached image, print its folder
    vm.py run [opts] -- ARGV    run ARGV in the guest, cwd = the checkout
    vm.py pytest [ARGS]         run `python3 -m pytest ARGS` in the guest

The checkout is shared into the guest over virtio-9p (so code changes need no
rebuild), the root disk is a throw-away qcow2 overlay on the cached image (so
several VMs can run at once), and a few blank virtio disks are attached for
tests that need real block devices (/dev/disk/by-id/virtio-zfsng-dN).
The exit code is the guest command's; 124 means timeout, 125 a harness error.
QEMU is killed on every exit path.  Dev tool: runs on the host's Python.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("ZFSNG_CACHE", os.path.expanduser("~/.cache/zfs-ng"))
READY_LINE = "zfsng-init: started"
KVM_PROBE_SECONDS = 25


class HarnessError(Exception):
    pass


def log(msg):
    print("vm: " + msg, file=sys.stderr, flush=True)


def image_dir():
    """Build the image if its recipe changed; return its folder.  A lock keeps
    concurrent runs from building it twice."""
    import fcntl
    os.makedirs(CACHE, exist_ok=True)
    lock = open(os.path.join(CACHE, "image.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    out = subprocess.run([os.path.join(HERE, "build-image.sh")],
                         stdout=subprocess.PIPE, check=False)
    if out.returncode != 0:
        raise HarnessError("image build failed (exit %d)" % out.returncode)
    return out.stdout.decode().strip().splitlines()[-1]


class Guest:
    """One QEMU process on a run folder; kill() is safe to call twice."""

    def __init__(self, image, rundir, accel, mem, smp, disks, disk_size,
                 init="/sbin/zfsng-init", persistent=()):
        """persistent: (path, cache) pairs of existing raw files kept across
        boots, attached after the blank disks as /dev/disk/by-id/virtio-zfsng-pN.
        cache is QEMU's: "writeback" (host page cache; a guest flush is an
        fdatasync of the file) or "none" (O_DIRECT on the file, flush the same)."""
        self.rundir = rundir
        self.console = os.path.join(rundir, "console.log")
        overlay = os.path.join(rundir, "root.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                        "-b", os.path.join(image, "root.img"), overlay], check=True)
        if accel == "kvm":
            machine = ["-accel", "kvm", "-cpu", "host"]
        else:
            machine = ["-accel", "tcg,thread=multi", "-cpu", os.environ.get("ZFSNG_VM_CPU", "max")]
        argv = ["qemu-system-x86_64", "-nodefaults", "-no-reboot", "-display", "none",
                "-monitor", "none", "-serial", "file:" + self.console,
                "-m", str(mem), "-smp", str(smp)] + machine + [
            "-kernel", os.path.join(image, "vmlinuz"),
            "-initrd", os.path.join(image, "initrd.img"),
            "-append", "root=LABEL=zfsng-root rw console=ttyS0 panic=-1 init=%s "
                       "loglevel=4 net.ifnames=0" % init,
            # The root disk first and by label: device order is not a name.
            "-drive", "file=%s,if=none,id=root,format=qcow2,cache=unsafe" % overlay,
            "-device", "virtio-blk-pci,drive=root,serial=zfsng-root",
            "-virtfs", "local,path=%s,mount_tag=share,security_model=none,id=share" % CHECKOUT,
            "-virtfs", "local,path=%s,mount_tag=run,security_model=none,id=run" % rundir,
            "-nic", "none"]
        for i in range(disks):
            path = os.path.join(rundir, "disk%d.raw" % i)
            with open(path, "wb") as f:
                f.truncate(disk_size)
            argv += ["-drive", "file=%s,if=none,id=d%d,format=raw,cache=unsafe" % (path, i),
                     "-device", "virtio-blk-pci,drive=d%d,serial=zfsng-d%d" % (i, i)]
        for i, (path, cache) in enumerate(persistent):
            if cache not in ("writeback", "none", "directsync", "writethrough"):
                raise HarnessError("a persistent disk needs a cache mode that honours "
                                   "flushes, not %r" % cache)
            argv += ["-drive", "file=%s,if=none,id=p%d,format=raw,cache=%s" % (path, i, cache),
                     "-device", "virtio-blk-pci,drive=p%d,serial=zfsng-p%d" % (i, i)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(rundir, "qemu.log"), "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def console_text(self):
        try:
            with open(self.console, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def choose_accel(image):
    """KVM if it really boots the guest here, else TCG; the answer is cached
    per image, since a paravirtualised /dev/kvm can hang a stock kernel."""
    forced = os.environ.get("ZFSNG_VM_ACCEL")
    if forced:
        return forced
    cached = os.path.join(image, "accel")
    if os.path.exists(cached):
        return open(cached).read().strip()
    accel = "tcg"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        rundir = tempfile.mkdtemp(prefix="zfsng-kvm-probe-")
        with open(os.path.join(rundir, "argv.json"), "w") as f:
            json.dump(["true"], f)
        guest = Guest(image, rundir, "kvm", 1024, 1, 0, 0)
        try:
            deadline = time.time() + KVM_PROBE_SECONDS
            while time.time() < deadline and guest.alive():
                if READY_LINE in guest.console_text():
                    accel = "kvm"
                    break
                time.sleep(0.5)
        finally:
            guest.kill()
            shutil.rmtree(rundir, ignore_errors=True)
    log("accelerator: %s (cached in %s)" % (accel, cached))
    with open(cached, "w") as f:
        f.write(accel + "\n")
    return accel


BOOT_ATTEMPTS = int(os.environ.get("ZFSNG_VM_BOOT_ATTEMPTS", 4))
# Under TCG on a loaded 2-core machine a boot to the command takes 30-90 s.
BOOT_SECONDS = int(os.environ.get("ZFSNG_VM_BOOT_TIMEOUT", 420))
PANIC_MARKERS = ("Kernel panic", "Oops:", "BUG: ", "general protection fault")


def boot_failure(console):
    """The first kernel-panic-like line of a console log, or None."""
    for line in console.splitlines():
        if any(m in line for m in PANIC_MARKERS):
            return line.strip()
    return None


def start_guest(image, rundir, accel, mem, smp, disks, disk_size, out_path,
                attempts=None, boot_seconds=None, persistent=()):
    """Boot a guest until it starts the command (its output file exists).

    Returns the running Guest.

    A guest that dies or hangs before that point ran nothing, so booting again
    is safe: multi-threaded TCG occasionally panics the guest kernel early
    (an int3 Oops from kernel text patching).  Each failed boot's console is
    kept as console.bootN.log; after `attempts` failures HarnessError says so.
    """
    attempts = attempts or BOOT_ATTEMPTS
    boot_seconds = boot_seconds or BOOT_SECONDS
    # Harness self-test (tests/vm/test_vm_harness.py): the first N boots run
    # /bin/false as init, which panics the kernel ("Attempted to kill init").
    fail_boots = int(os.environ.get("ZFSNG_VM_FAIL_BOOTS", 0))
    failures = []
    for attempt in range(1, attempts + 1):
        t0 = time.time()
        init = "/bin/false" if attempt <= fail_boots else "/sbin/zfsng-init"
        guest = Guest(image, rundir, accel, mem, smp, disks, disk_size, init=init,
                      persistent=persistent)
        try:
            while not os.path.exists(out_path):
                if not guest.alive():
                    why = "QEMU exited"
                    break
                if time.time() - t0 > boot_seconds:
                    why = "not started after %d s" % boot_seconds
                    break
                time.sleep(0.5)
            else:
                if attempt > 1:
                    log("boot %d of %d reached the command" % (attempt, attempts))
                return guest
        except BaseException:   # SIGTERM (SystemExit) while booting: the caller
            guest.kill()        # has no guest yet to kill in its finally
            raise
        guest.kill()
        console = guest.console_text()
        kept = os.path.join(rundir, "console.boot%d.log" % attempt)
        if os.path.exists(guest.console):
            shutil.copyfile(guest.console, kept)
        panic = boot_failure(console)
        reason = "%s%s" % (why, ": " + panic if panic else "")
        failures.append(reason)
        log("boot %d of %d failed before the command started (%s); console kept in %s"
            % (attempt, attempts, reason, kept))
    raise HarnessError("the guest failed to boot %d times in a row: %s"
                       % (attempts, "; ".join(failures)))


def run(argv, timeout=1800, mem=4096, smp=None, disks=4, disk_size=2 << 30, keep=False,
        durations_to=None):
    """Run argv in a fresh guest; stream its output; return its exit code.
    durations_to: where to copy the guest's test-times log (if it wrote one)
    before the run folder goes."""
    image = image_dir()
    accel = choose_accel(image)
    smp = smp or min(os.cpu_count() or 1, 4)
    rundir = tempfile.mkdtemp(prefix="zfsng-vm-run-")
    with open(os.path.join(rundir, "argv.json"), "w") as f:
        json.dump(argv, f)
    t0 = time.time()
    log("booting (%s, %d vCPU, %d MiB): %s" % (accel, smp, mem, " ".join(argv)))
    out_path = os.path.join(rundir, "output")
    rc_path = os.path.join(rundir, "rc")
    rc = 125
    guest = None
    pos = 0
    try:
        try:
            guest = start_guest(image, rundir, accel, mem, smp, disks, disk_size, out_path)
        except HarnessError as e:
            log(str(e))
            keep = True
            return rc
        while True:
            if os.path.exists(out_path):
                with open(out_path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                if chunk:
                    pos += len(chunk)
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
            if os.path.exists(rc_path):
                rc = int(open(rc_path).read().strip() or 125)
                break
            if not guest.alive():
                panic = boot_failure(guest.console_text())
                log("QEMU exited before the command finished"
                    + (" (guest kernel: %s)" % panic if panic else ""))
                break
            if time.time() - t0 > timeout:
                log("timeout after %d s" % timeout)
                rc = 124
                break
            time.sleep(0.5)
        # Flush what was written between the last read and the rc file.
        if os.path.exists(out_path):
            with open(out_path, "rb") as f:
                f.seek(pos)
                sys.stdout.write(f.read().decode("utf-8", "replace"))
                sys.stdout.flush()
    finally:
        if guest is not None:
            deadline = time.time() + 20
            while guest.alive() and time.time() < deadline and os.path.exists(rc_path):
                time.sleep(0.2)
            guest.kill()
        log("guest finished rc=%d in %.0f s" % (rc, time.time() - t0))
        if durations_to and os.path.exists(os.path.join(rundir, DURATIONS_LOG)):
            shutil.copyfile(os.path.join(rundir, DURATIONS_LOG), durations_to)
        _keep_or_clean(rundir, rc, keep, guest, out_path)
    return rc


VERDICTS = ("FAILED ", "ERROR ")     # how pytest's -ra one-line verdicts begin


def summary_lines(output):
    """pytest's one-line verdicts (-ra: 'FAILED test - Error: message') in output."""
    return [l for l in output.splitlines() if l.startswith(VERDICTS)]


# The guest's test-times log in the run folder, one "seconds<TAB>nodeid" line
# per test as it ends (written by tests/e2e/conftest.py, named by guest-run.sh).
DURATIONS_LOG = "durations.tsv"


def read_durations(path):
    """[(seconds, nodeid)] from a durations log; [] when there is none."""
    try:
        with open(path) as f:
            rows = [line.rstrip("\n").split("\t", 1) for line in f if "\t" in line]
    except OSError:
        return []
    return [(float(t), name) for t, name in rows]


def slowest(durations_path, n=15):
    """The n slowest tests in the guest's durations log, and how many tests
    ended and in how long: [] when there is no log."""
    rows = read_durations(durations_path)
    if not rows:
        return []
    total = sum(t for t, _ in rows)
    lines = ["%d tests ended, %.0f s in tests; the slowest:" % (len(rows), total)]
    lines += ["%7.1f s  %s" % row for row in sorted(rows, reverse=True)[:n]]
    return lines


def _keep_or_clean(rundir, rc, keep, guest, out_path):
    if rc == 0 and not keep:
        shutil.rmtree(rundir, ignore_errors=True)
        return
    if rc != 0 and guest is not None:
        tail = guest.console_text().splitlines()[-40:]
        log("kernel console (last lines):\n    " + "\n    ".join(tail))
    log("logs kept in " + rundir)
    if rc == 124:
        # pytest's own --durations table dies with the guest at a timeout
        lines = slowest(os.path.join(rundir, DURATIONS_LOG))
        if lines:
            log("test times (the guest's durations log):\n    " + "\n    ".join(lines))
    if rc != 0 and os.path.exists(out_path):
        # again at the very end: a CI that shows only the head and the tail of
        # a long log cut the failing assertion out of stop 19's
        with open(out_path, "rb") as f:
            verdicts = summary_lines(f.read().decode("utf-8", "replace"))
        if verdicts:
            log("what failed (pytest's summary, repeated):\n    " + "\n    ".join(verdicts))
    for name in os.listdir(rundir):
        if name.endswith((".raw", ".qcow2")):
            os.unlink(os.path.join(rundir, name))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("image")
    for name in ("run", "pytest"):
        s = sub.add_parser(name)
        s.add_argument("--timeout", type=int, default=int(os.environ.get("ZFSNG_VM_TIMEOUT", 2400)))
        s.add_argument("--mem", type=int, default=4096)
        s.add_argument("--smp", type=int, default=None)
        s.add_argument("--disks", type=int, default=4)
        s.add_argument("--keep", action="store_true", help="keep the run folder")
        s.add_argument("--durations-to", help="copy the guest's test-times log here")
        s.add_argument("argv", nargs=argparse.REMAINDER)
    # Options vm.py does not know (pytest's -q, -k ...) pass through, in order.
    a, unknown = p.parse_known_args()
    # SIGTERM from a CI timeout unwinds through run()'s finally and kills QEMU.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if a.cmd == "image":
            print(image_dir())
            return 0
        argv = unknown + (a.argv[1:] if a.argv[:1] == ["--"] else a.argv)
        if a.cmd == "pytest":
            argv = ["python3", "-m", "pytest"] + argv
        if not argv:
            p.error("nothing to run")
        return run(argv, timeout=a.timeout, mem=a.mem, smp=a.smp, disks=a.disks, keep=a.keep,
                   durations_to=a.durations_to)
    except HarnessError as e:
        log(str(e))
        return 125


if __name__ == "__main__":
    sys.exit(main())
