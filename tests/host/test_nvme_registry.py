"""nvmeof_target.registry read from outside the target (the volume plugin at boot)."""

import uuid
def test_served_nqns_reads_a_registry_without_the_target(tmp_path):
    from nvmeof_target import registry
    path = str(tmp_path / "odd?#name.db")      # URI characters in the path
    assert registry.served_nqns(path) == []    # no registry yet
    r = registry.Registry(path)
    r.add("nqn.2014-08.org.zfs-ng:sr1:k1", "/dev/zvol/p/zfs-ng/k1", str(uuid.uuid4()))
    r.add("nqn.2014-08.org.zfs-ng:sr1:k2", "/dev/zvol/p/zfs-ng/k2", str(uuid.uuid4()))
    assert sorted(registry.served_nqns(path)) == ["nqn.2014-08.org.zfs-ng:sr1:k1",
                                                  "nqn.2014-08.org.zfs-ng:sr1:k2"]
    r.remove("nqn.2014-08.org.zfs-ng:sr1:k1")
    r.close()
    assert registry.served_nqns(path) == ["nqn.2014-08.org.zfs-ng:sr1:k2"]
