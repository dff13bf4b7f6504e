#!/usr/bin/python3 -S
"""SR.* entry point (methods are symlinks to this file).

-S: xapi forks one interpreter per call, so skip site's scan of dist-packages
unless the package is not in a checkout next to this script."""
import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.realpath(__file__)))))
if os.path.exists(os.path.join(_root, "plugins", "smapi.py")):
    sys.path[0] = _root  # a checkout: no need for the script's own directory
else:
    import site  # installed: the package lives in site-packages
    site.main()

from plugins import smapi  # noqa: E402
from plugins.volume import methods  # noqa: E402

if __name__ == "__main__":
    sys.exit(smapi.main(methods.SR))
