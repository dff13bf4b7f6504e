"""nbd_server on a real Python 3.6 (XCP-ng 8.3's dom0 runs 3.6): the server
in-process under python3.6, nbdcopy both ways and nbdinfo --map against it.
vermin checks the syntax; this checks the behaviour (stdlib APIs, bytes
handling) of the interpreter itself."""

import subprocess

import pytest

from conftest import ROOT, python36

SCRIPT = r'''
import hashlib, os, subprocess, sys, threading
sys.path.insert(0, sys.argv[1])
from nbd_server.exports import Export, ExportTable
from nbd_server.extents import DirtyBitmap
from nbd_server.server import Server
tmp = sys.argv[2]
img, src, out = (os.path.join(tmp, n) for n in ("d.img", "src.img", "out.img"))
with open(img, "wb") as f:
    f.truncate(16 << 20)
with open(src, "wb") as f:
    f.write(os.urandom(8 << 20))
    f.truncate(16 << 20)
table = ExportTable([Export("d", img, bitmaps={"b": DirtyBitmap(b"\xf0")})])
server = Server(table, unix_path=os.path.join(tmp, "s.sock"))
server.listen()
t = threading.Thread(target=server.serve_forever)
t.start()
try:
    uri = "nbd+unix:///d?socket=" + os.path.join(tmp, "s.sock")
    subprocess.check_call(["nbdcopy", src, uri])
    subprocess.check_call(["nbdcopy", uri, out])
    h = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
    assert h(src) == h(img) == h(out)
    bm = subprocess.check_output(["nbdinfo", "--map=qemu:dirty-bitmap:b", uri]).split()
    assert bm[:3] == [b"0", b"262144", b"1"], bm
    alloc = subprocess.check_output(["nbdinfo", "--map", uri]).split()
    assert alloc[:6] == [b"0", b"8388608", b"0", b"data", b"8388608", b"8388608"], alloc
finally:
    server.shutdown()
    t.join()
print(sys.version_info[:2])
'''


def test_server_runs_on_python36(tmp_path):
    py = python36()
    if py is None:
        pytest.skip("no python3.6 interpreter on this machine (vermin still checks the syntax)")
    script = tmp_path / "py36.py"
    script.write_text(SCRIPT)
    r = subprocess.run([py, str(script), ROOT, str(tmp_path)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(3, 6)"
