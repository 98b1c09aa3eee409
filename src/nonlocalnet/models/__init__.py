"""Networks of the three papers: 2D ResNets, C2D/I3D video ResNets, segmentation, detection
(torchvision's Mask R-CNN / Faster R-CNN on our ResNet-FPN), stage features, a model zoo.

Placement of attention blocks is data (per-stage block indices), validated against the stage
depths; :func:`insert_blocks` puts any block after any named submodule of any model, and
:func:`check_identity` verifies that freshly inserted blocks leave the output unchanged.
"""

from nonlocalnet.models.builders import add_blocks, create_resnet
from nonlocalnet.models.detection import create_detection_backbone, create_detection_model
from nonlocalnet.models.features import FeatureInfo, ResNetFeatures
from nonlocalnet.models.placement import (
    check_identity,
    check_placement,
    gc_placement,
    insert_blocks,
    insert_context_blocks,
    inserted_blocks,
    nl_preset,
    place_blocks,
    without_blocks,
)
from nonlocalnet.models.resnet import ResNet
from nonlocalnet.models.segmentation import SegmentationModel, create_segmentation_model
from nonlocalnet.models.video_resnet import (
    create_video_resnet,
    inflate_state_dict,
    load_2d_checkpoint,
)
from nonlocalnet.models.zoo import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "FeatureInfo",
    "ModelInfo",
    "ResNet",
    "ResNetFeatures",
    "SegmentationModel",
    "add_blocks",
    "check_identity",
    "check_placement",
    "create_detection_backbone",
    "create_detection_model",
    "create_model",
    "create_resnet",
    "create_segmentation_model",
    "create_video_resnet",
    "gc_placement",
    "inflate_state_dict",
    "insert_blocks",
    "insert_context_blocks",
    "inserted_blocks",
    "list_models",
    "load_2d_checkpoint",
    "model_info",
    "nl_preset",
    "place_blocks",
    "register_model",
    "without_blocks",
]
