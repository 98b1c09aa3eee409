"""Checkpoints of other implementations, converted into this library's models exactly.

``convert_state_dict(state_dict, source, model=None, **options)`` renames a checkpoint of
``source`` into our keys, completes it against the target model (a registered name, a module of
one's own, or, when omitted, the registered model the checkpoint fits), and returns a
:class:`Conversion`: the state_dict (it loads with ``strict=True``), the ``create_model``
overrides that make the model compute what the source computes (pooling position and rounding
of the NL blocks, logit scale, eps, stem strides), and a report of what was mapped::

    conv = convert_state_dict(torch.load("mmaction_nl_i3d.pth", weights_only=True),
                              "mmaction2", pairwise="dot_product")
    print(conv.report.table())
    model = conv.model                  # create_model(conv.model_name, **conv.overrides), loaded

:func:`~nonlocalnet.convert.weights.load_pretrained` starts a model from a checkpoint of any
source (ImageNet ResNets inflated into video networks, loaded into segmentation backbones) and
says what was loaded, what is new and what was dropped: the converter renames, then
:func:`nonlocalnet.models.weights.load_state` loads, as it does for the formats that need no
converter (``"torchvision"``, ``"nonlocalnet"``: :func:`nonlocalnet.models.weights.load_pretrained`).

Sources (``SOURCES``): ``caffe2``, ``slowfast``, ``pytorchvideo``, ``mmaction2``, ``mmdet``,
``mmseg``, ``mmcv``, ``timm``, ``torchvision``; each module documents its key layout.
"""

from nonlocalnet.convert._convert import (
    SOURCES,
    Conversion,
    convert_state_dict,
    get_converter,
    unwrap_state,
)
from nonlocalnet.convert._core import ConversionError, ConversionReport
from nonlocalnet.convert.weights import (
    LoadReport,
    create_model,
    load_pretrained,
    read_checkpoint,
    save_converted,
)

__all__ = [
    "SOURCES",
    "Conversion",
    "ConversionError",
    "ConversionReport",
    "LoadReport",
    "convert_state_dict",
    "create_model",
    "get_converter",
    "load_pretrained",
    "read_checkpoint",
    "save_converted",
    "unwrap_state",
]
