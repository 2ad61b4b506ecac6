"""Serving a trained SegNeXt: loading any checkpoint, the `Segmenter`, drawing, and what the command lines share.

- `loading`: `load(path, step)` of a training workdir, a model directory or a PyTorch `.pth` / JSeg `.pkl`;
- `pytorch`, `pth_io`, `pth_layouts`: PyTorch checkpoints read (and written) without torch;
- `segmenter`: the public `Segmenter` (`segnext_jax.Segmenter`);
- `folder`: a folder of images segmented into label maps, overlays and scores (`python -m segnext_jax.predict`);
- `drawing`: palettes, colour overlays and legends (prediction and evaluation's sample overlays);
- `batching`: images grouped by size for the network;
- `cli`: how the command lines report our bugs.
"""
