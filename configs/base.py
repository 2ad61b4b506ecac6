"""The shared training recipe: `make_config(dataset, variant)` returns the full ml_collections config.

Every `configs/<dataset>_<variant>.py` is `get_config()` around this function (`coco_stuff_*`, `pascal_context_*` and
`voc_*` use the data registry's names coco_stuff164k, pascal_context_59, pascal_voc12_aug). Config files are
loaded by path (`--config=configs/ade20k_b.py`, through `config_flags.DEFINE_config_file`), not imported as a
package, so they load this file by its path next to them:

    make_config = runpy.run_path(os.path.join(os.path.dirname(__file__), "base.py"))["make_config"]

which works from any working directory and needs nothing on `sys.path`.

Sources of the values (../shared/reference/segnext_reference.md §3): optimiser and schedule are the reference's
(AdamW 6e-5, head lr x10, 1500 warm-up iterations from 1e-6, poly power 1 to 0); crop sizes, global batch sizes and
iteration counts are the paper's (its §4 and appendix table); resize scales, `cat_max_ratio` and evaluation modes
follow MMSegmentation 1.2.2's dataset and model configs for each dataset:
- ADE20K, COCO-Stuff-164k, VOC 2012 aug: scale (2048, 512), whole-image evaluation.
- Cityscapes: scale (2048, 1024), sliding-window evaluation 1024 / 768 (the official SegNeXt config).
- Pascal Context 59: scale (520, 520) for the training resize and the test resize, crop 480, sliding-window
  evaluation 480 / 320: `_base_/datasets/pascal_context_59.py` and every MMSegmentation Pascal Context model config.
  The paper gives only the crop size, so the rest is MMSegmentation's convention.
- iSAID: scale (896, 896) (the 896 x 896 patches), crop 896, whole-image evaluation (`_base_/datasets/isaid.py`).
"""

from typing import NamedTuple

import ml_collections
from ml_collections import config_dict

VARIANTS = ("t", "s", "b", "l")


class Recipe(NamedTuple):
    """What differs between datasets (keyed by their names in segnext_jax.data.datasets.DATASETS)."""

    num_classes: int
    crop_size: tuple[int, int]  # (height, width) of the training crop
    scale: tuple[int, int]  # keep-ratio resize bound (long, short), for training (times the ratio) and evaluation
    global_batch_size: int
    num_steps: int
    eval_mode: str  # 'whole' or 'slide'
    eval_stride: tuple[int, int]  # sliding-window stride (used when eval.mode == 'slide')


RECIPES = {
    "ade20k": Recipe(150, (512, 512), (2048, 512), 16, 160_000, "whole", (341, 341)),
    "cityscapes": Recipe(19, (1024, 1024), (2048, 1024), 8, 160_000, "slide", (768, 768)),
    "coco_stuff164k": Recipe(171, (512, 512), (2048, 512), 16, 80_000, "whole", (341, 341)),
    "pascal_context_59": Recipe(59, (480, 480), (520, 520), 16, 80_000, "slide", (320, 320)),
    "pascal_voc12_aug": Recipe(21, (512, 512), (2048, 512), 16, 80_000, "whole", (341, 341)),
    "isaid": Recipe(16, (896, 896), (896, 896), 16, 160_000, "whole", (597, 597)),
    # The built-in procedural demo data (segnext_jax.data.demo): 128 x 128 images, 6 classes. configs/demo.py sets
    # the rest of its from-scratch recipe.
    "demo": Recipe(6, (128, 128), (256, 128), 8, 400, "whole", (85, 85)),
}


def make_config(dataset: str, variant: str) -> ml_collections.ConfigDict:
    """Returns the reference recipe of SegNeXt-`variant` ('t', 's', 'b', 'l') on `dataset` (a key of RECIPES)."""
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r} in configs/base.py: choose one of {', '.join(RECIPES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown SegNeXt variant {variant!r} in configs/base.py: choose one of {', '.join(VARIANTS)}")
    recipe = RECIPES[dataset]
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameter init, the data order and augmentation, drop path, dropout and NMF bases

    # Exactly the keyword arguments of segnext_jax.models.create (checkpoints rebuild the model from them).
    config.model = ml_collections.ConfigDict()
    config.model.variant = variant  # 't' | 's' | 'b' | 'l' (segnext_reference.md §3.1)
    config.model.num_classes = recipe.num_classes
    config.model.drop_path_rate = config_dict.placeholder(float)  # None: the variant's (0.1 T/S/B, 0.3 L)
    config.model.dropout_ratio = 0.1  # dropout before the decode head's classifier
    config.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (parameters stay float32)
    config.model.depthwise_impl = "auto"  # 'auto' | 'xla' | 'shift_add' (segnext_jax.models.depthwise)
    config.model.nmf_one_step_grad = False  # True: gradient through the last NMF step only (the paper's option)
    config.model.nmf_bases = "random"  # 'random': fresh NMF bases per image and call (the reference) | 'fixed': stored
    config.model.nmf_seed = config_dict.placeholder(int)  # 'fixed': seed of the stored bases (None: the init key)

    config.init = ml_collections.ConfigDict()
    # '' (random init) or a converted orbax checkpoint directory (python -m weights_conversion IN.pth OUT_DIR),
    # relative to the working directory. The ImageNet MSCAN backbones convert to pretrained/mscan_{t,s,b,l}.
    config.init.pretrained = f"pretrained/mscan_{variant}"
    config.init.pretrained_kind = "backbone"  # 'backbone': load the encoder only | 'model': the whole segmentor

    config.data = ml_collections.ConfigDict()
    config.data.dataset = dataset
    config.data.root = config_dict.placeholder(str)  # None: the dataset's usual place (MMSegmentation's data/ layout)
    config.data.source = "files"  # 'files' (the prepared directory) | 'tfds' (ArrayRecord from scripts/ builders)
    config.data.crop_size = recipe.crop_size  # (height, width) of the random training crop
    config.data.scale = recipe.scale  # keep-ratio resize bound (long, short) before cropping
    config.data.ratio_range = (0.5, 2.0)  # the training resize bound is scale * U(ratio_range)
    config.data.cat_max_ratio = 0.75  # a crop is re-drawn (up to 10 times) while one class covers more than this
    config.data.test_scale = recipe.scale  # keep-ratio resize bound (long, short) of evaluation images
    config.data.num_workers = 4  # data loading processes per host; 0 loads in the training process
    config.data.bad_example = "skip"  # unreadable / inconsistent example: 'skip' it (logged, counted) | 'stop' the run
    config.data.max_image_pixels = 89_478_485  # larger images / labels (width x height) are bad examples; PIL's limit

    config.train = ml_collections.ConfigDict()
    config.train.global_batch_size = recipe.global_batch_size  # images per optimiser step, over all devices and hosts
    config.train.num_steps = recipe.num_steps  # optimiser steps (the reference's iterations)
    config.train.grad_accum_steps = 1  # micro-batches per step (each global_batch_size / grad_accum_steps images)
    config.train.log_every = 50  # steps between console / TensorBoard scalars (MMSegmentation's logger interval)
    config.train.eval_every = 16_000  # steps between validations (MMSegmentation 1.x val_interval); 0 = never
    config.train.checkpoint_every = 2_000  # steps between checkpoints (SIGTERM also saves at once)
    config.train.keep_checkpoints = 3  # latest checkpoints kept, plus the one with the best validation mIoU
    config.train.sample_predictions = 4  # validation images logged as image | ground truth | prediction
    # a step whose loss, gradients or new parameters are not finite changes nothing and: 'stop's the run (nothing
    # non-finite is saved) | is 'skip'ped, until max_nonfinite_in_a_row such steps follow each other
    config.train.on_nonfinite = "stop"
    config.train.max_nonfinite_in_a_row = 5
    config.train.profile_steps = (0, 0)  # (first, last) step traced by jax.profiler into WORKDIR/profile; (0, 0): none

    config.optimizer = ml_collections.ConfigDict()  # AdamW, segnext_reference.md §3.2-3.3
    config.optimizer.lr = 6e-5  # base learning rate (backbone)
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.01  # decoupled; 0 for parameters whose name contains 'norm' (reference rule)
    config.optimizer.head_lr_mult = 10.0  # learning-rate multiplier of every decode_head parameter
    config.optimizer.warmup_steps = 1500  # linear warm-up length
    config.optimizer.warmup_ratio = 1e-6  # warm-up starts at lr * warmup_ratio
    config.optimizer.power = 1.0  # poly decay exponent
    config.optimizer.min_lr = 0.0  # poly decay end value
    config.optimizer.schedule = "mmseg"  # 'mmseg': LinearLR then PolyLR (MMSegmentation 1.x) | 'official' (mmcv 1.x)

    config.eval = ml_collections.ConfigDict()
    config.eval.mode = recipe.eval_mode  # 'whole': pad to a multiple of 32 | 'slide': windows of crop_size
    config.eval.crop_size = recipe.crop_size  # sliding-window size (height, width)
    config.eval.stride = recipe.eval_stride  # sliding-window stride (height, width)
    config.eval.scales = (1.0,)  # test_scale multipliers; (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for multi-scale
    config.eval.flip = False  # also average the horizontally flipped prediction
    config.eval.seed = 0  # seeds the NMF bases, so a checkpoint's score is repeatable
    config.eval.batch_size = 1  # images per evaluation step; whole mode pads each image alone (as the reference)
    return config
