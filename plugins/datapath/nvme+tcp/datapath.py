#!/usr/bin/env python3
"""SMAPIv3 datapath plugin for nvme+tcp:// URIs (one symlink per method)."""

import os
import sys

# plugins/datapath/<scheme>/datapath.py -> the directory holding `plugins`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.realpath(__file__))))))

from plugins import smapi  # noqa: E402
from plugins.datapath import nvme  # noqa: E402

if __name__ == "__main__":
    sys.exit(smapi.main(nvme.methods()))
