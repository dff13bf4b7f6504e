"""nbd_server/nbdkit_plugin.py under the real nbdkit python plugin, driven by
nbdinfo and nbdcopy in nbdkit's captive mode (--run, no TCP port)."""

import hashlib
import json
import os
import subprocess

MiB = 1 << 20
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "nbd_server",
                      "nbdkit_plugin.py")


def nbdkit(image, run, *params):
    r = subprocess.run(["nbdkit", "-U", "-", "python", PLUGIN, "path=" + image] + list(params)
                       + ["--run", run], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    return r


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_map_of_a_sparse_file_and_of_an_allocation_file(tmp_path):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(b"x" * 4096)
    r = nbdkit(img, 'nbdinfo --map --json "$uri"')
    assert r.returncode == 0, r.stderr
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)] == [
        (0, 2 * MiB, 3), (2 * MiB, 4096, 0), (2 * MiB + 4096, 6 * MiB - 4096, 3)]
    amap = tmp_path / "alloc.json"
    amap.write_text(json.dumps({"allocated": [[MiB, MiB]]}))
    r = nbdkit(img, 'nbdinfo --map --json "$uri"', "allocation=" + str(amap))
    assert r.returncode == 0, r.stderr
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)] == [
        (0, MiB, 3), (MiB, MiB, 0), (2 * MiB, 6 * MiB, 3)]


def test_nbdcopy_roundtrip_and_read_only(tmp_path):
    img, src, out = (str(tmp_path / n) for n in ("d.img", "src.img", "out.img"))
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    with open(src, "wb") as f:
        f.write(os.urandom(16 * MiB))
    r = nbdkit(img, 'nbdcopy %s "$uri" && nbdcopy "$uri" %s' % (src, out))
    assert r.returncode == 0, r.stderr
    assert sha(img) == sha(src) == sha(out)
    r = nbdkit(img, 'nbdinfo --json "$uri"', "readonly=true")
    assert json.loads(r.stdout)["exports"][0]["is_read_only"] is True
    r = nbdkit(img, 'nbdcopy %s "$uri"' % out, "readonly=true")
    assert r.returncode != 0


def test_bad_parameters_fail_at_startup(tmp_path):
    r = nbdkit(str(tmp_path / "missing.img"), "true")
    assert r.returncode != 0 and "No such file" in r.stderr
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    r = nbdkit(str(img), "true", "colour=blue")
    assert r.returncode != 0 and "unknown parameter 'colour'" in r.stderr
