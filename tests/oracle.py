"""The reference implementation (MMSegmentation 1.2.2 on CPU PyTorch), imported for parity tests.

mmcv-lite ships no compiled ops, so `import mmseg` fails on `mmcv._ext`; MSCAN and LightHamHead use none of
them, so a stand-in module whose functions raise is registered first.
"""

import importlib.machinery
import sys
import types


def _stub_mmcv_ext() -> None:
    if "mmcv._ext" in sys.modules:
        return
    stub = types.ModuleType("mmcv._ext")
    stub.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)  # mmengine probes it with find_spec

    def _missing(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def fail(*args, **kwargs):
            raise RuntimeError(f"mmcv._ext.{name} is not available in mmcv-lite")

        return fail

    stub.__getattr__ = _missing  # type: ignore[attr-defined]
    sys.modules["mmcv._ext"] = stub


def import_mmseg():
    """Returns the `mmseg` package, importable without mmcv's compiled extension."""
    _stub_mmcv_ext()
    import mmseg  # noqa: F401
    import mmseg.models  # noqa: F401

    return sys.modules["mmseg"]


# The reference's architecture per variant: embed dims, depths, head channels, NMF rank (mmseg 1.2.2 configs/segnext).
REFERENCE_VARIANTS = {
    "t": ([32, 64, 160, 256], [3, 3, 5, 2], 256, 16),
    "s": ([64, 128, 320, 512], [2, 2, 4, 2], 256, 16),
    "b": ([64, 128, 320, 512], [3, 3, 12, 3], 512, 64),
    "l": ([64, 128, 320, 512], [3, 5, 27, 3], 1024, 64),
}


def build_reference(
    variant: str,
    num_classes: int,
    *,
    seed: int = 0,
    drop_path_rate: float = 0.0,
    dropout_ratio: float = 0.0,
    randomize: bool = True,
):
    """mmseg's MSCAN and LightHamHead for `variant`, with random weights and non-trivial BatchNorm statistics.

    Norm scales, layer scales, biases and running statistics are drawn away from their initial values so that a
    parity test sees every parameter act (layer scales stay small enough that the deepest model stays finite).
    """
    import torch

    import_mmseg()
    from mmseg.models.backbones.mscan import MSCAN
    from mmseg.models.decode_heads.ham_head import LightHamHead

    embed_dims, depths, channels, rank = REFERENCE_VARIANTS[variant]
    torch.manual_seed(seed)
    backbone = MSCAN(
        embed_dims=embed_dims,
        depths=depths,
        mlp_ratios=[8, 8, 4, 4],
        drop_path_rate=drop_path_rate,
        norm_cfg=dict(type="BN", requires_grad=True),
    )
    head = LightHamHead(
        in_channels=embed_dims[1:],
        in_index=[1, 2, 3],
        channels=channels,
        ham_channels=channels,
        dropout_ratio=dropout_ratio,
        num_classes=num_classes,
        align_corners=False,
        norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
        ham_kwargs=dict(MD_S=1, MD_R=rank, train_steps=6, eval_steps=7, inv_t=100, rand_init=True),
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )
    if randomize:
        with torch.no_grad():
            for name, p in list(backbone.named_parameters()) + list(head.named_parameters()):
                if "layer_scale" in name:
                    p.copy_(torch.rand_like(p) * 0.2 + 0.05)
                elif name.endswith("bias"):
                    p.copy_(torch.randn_like(p) * 0.1)
                elif p.ndim == 1:  # BatchNorm / LayerNorm / GroupNorm scales
                    p.copy_(torch.rand_like(p) + 0.5)
            for name, b in backbone.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn_like(b) * 0.1)
                elif name.endswith("running_var"):
                    b.copy_(torch.rand_like(b) + 0.5)
    return backbone, head


def reference_state_dict(backbone, head) -> dict:
    """The segmentor's state_dict (mmseg naming, `backbone.` / `decode_head.` prefixes) as numpy arrays."""
    state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    state.update({"decode_head." + k: v for k, v in head.state_dict().items()})
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def fix_reference_bases(head, bases) -> None:
    """Makes the reference's NMF use `bases` (a torch tensor, (B*S, D, R)) instead of drawing random ones."""
    head.hamburger.ham._build_bases = lambda B, S, D, R, device=None: bases.clone()
