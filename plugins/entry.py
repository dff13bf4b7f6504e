"""What every plugin executable does once `plugins` is importable: run the
method it was called as, from the table of the directory it lives in.

xapi-storage-script executes <plugin dir>/<Interface>.<method>; each such
name is a symlink to the directory's one executable, which only puts the
checkout on sys.path (or, when not in a checkout, runs site to reach
site-packages: the scripts start with python3 -S because xapi forks one
interpreter per call) and calls main(__file__).  smapi.main then dispatches
on the name the script was called by."""

import importlib
import os

from plugins import smapi, uri

VOLUME_PLUGIN = "org.xen.xapi.storage.zfs-ng"

# datapath plugin directory (the URI scheme) -> its module in plugins.datapath
DATAPATHS = {uri.RAW: "raw", uri.NBD: "nbd", uri.NVME_TCP: "nvme", uri.NBD_TLS: "nbdtls"}


def methods_of(plugin):
    """The SMAPIv3 method table of a plugin directory name."""
    if plugin == VOLUME_PLUGIN:
        from plugins.volume import methods
        return methods.PLUGIN + methods.SR + methods.VOLUME
    if plugin in DATAPATHS:
        return importlib.import_module("plugins.datapath." + DATAPATHS[plugin]).methods()
    raise KeyError("no zfs-ng plugin is called %r" % plugin)


def main(script, argv=None):
    """Entry point of an executable at `script`; returns the exit status."""
    plugin = os.path.basename(os.path.dirname(os.path.realpath(script)))
    return smapi.main(methods_of(plugin), argv)
