"""SegNeXt-T on COCO-Stuff-164k: the reference recipe (values and sources in configs/base.py)."""

import os
import runpy

import ml_collections

make_config = runpy.run_path(os.path.join(os.path.dirname(__file__), "base.py"))["make_config"]


def get_config() -> ml_collections.ConfigDict:
    return make_config("coco_stuff164k", "t")
