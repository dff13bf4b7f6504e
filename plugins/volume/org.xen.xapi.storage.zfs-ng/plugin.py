#!/usr/bin/env python3
"""Plugin.* entry point (methods are symlinks to this file)."""
import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.realpath(__file__)))))
if os.path.exists(os.path.join(_root, "plugins", "smapi.py")):
    sys.path.insert(0, _root)  # a checkout; installed packages are on sys.path already

from plugins import smapi  # noqa: E402
from plugins.volume import methods  # noqa: E402

if __name__ == "__main__":
    sys.exit(smapi.main(methods.PLUGIN))
