#!/usr/bin/python3 -S
"""Every method of this plugin is a symlink to this file: see plugins/entry.py."""
import os
import sys
_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.realpath(__file__)))))
if os.path.isfile(os.path.join(_root, "plugins", "entry.py")):
    sys.path[0] = _root  # a checkout holding plugins/
else:  # installed: the package is in site-packages; nothing of ours ahead of it
    del sys.path[0]
    import site
    site.main()
from plugins import entry  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry.main(__file__))
