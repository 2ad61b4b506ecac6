"""SegNeXt-T fine-tuned on your own data (the `folder` dataset): the ADE20K recipe, shortened for small datasets.

    python -m segnext_jax.data.check --dataset=folder --root=data/mydata
    python -m segnext_jax.main --config=configs/folder_t.py --config.data.root=data/mydata --workdir=workdir/mydata

The root holds images/{train,val}, masks/{train,val} (PNG, named like their image) and classes.txt or classes.json (see
segnext_jax/data/datasets.py). The number of classes is read from there when the run starts
(`configuration.fill_from_dataset`): config.model.num_classes stays None here.

What differs from configs/ade20k_t.py (ImageNet MSCAN-T backbone in pretrained/mscan_t, AdamW 6e-5, head x10, poly
decay, crop 512, resize bound (2048, 512), whole-image evaluation are kept):
- 8000 steps of 8 crops instead of 160k of 16: 64k crops, about 100 passes over 640 training images. Scale it with
  the data (about 100 passes: 20k steps for 1600 images; a few dozen images need only 2000-4000 steps). Batch 8 needs
  half the reference's accelerator memory and gives twice the optimiser steps per pass over a small dataset.
- warm-up 300 steps (ADE20K's 1500 would be a fifth of the run), validation and checkpoints every 1000 steps.
- data.reduce_zero_label: None takes the folder's setting (classes.json's "reduce_zero_label", default false); set
  true when mask value 0 means "unlabelled" and 1..N are the N classes listed.
Anything can be changed on the command line, e.g. `--config.train.num_steps=4000 --config.data.crop_size=(384,384)`.
"""

import ml_collections
from ml_collections import config_dict

from segnext_jax import configuration


def get_config() -> ml_collections.ConfigDict:
    config = configuration.make_config("ade20k", "t")
    config.model.num_classes = config_dict.placeholder(int)  # None: the folder's classes (fill_from_dataset)
    config.data.dataset = "folder"  # data.reduce_zero_label None: the folder's own setting (classes.json, false)
    config.train.global_batch_size = 8
    config.train.num_steps = 8000
    config.train.log_every = 50
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.optimizer.warmup_steps = 300
    return config
