#!/usr/bin/python3 -S
"""Every method of this plugin is a symlink to this file: see plugins/entry.py."""
import os
import sys
sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.realpath(__file__)))))  # the checkout holding plugins/
try:
    from plugins import entry
except ImportError:  # installed, not a checkout: the package is in site-packages
    import site
    site.main()
    from plugins import entry

if __name__ == "__main__":
    sys.exit(entry.main(__file__))
