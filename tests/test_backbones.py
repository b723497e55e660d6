"""Backbones: ImageNet ranking with the shipped weights, torchvision layout, FLOPs, errors."""

import numpy as np
import pytest
import torch
from skimage import data

from features.backbones import BackboneError, ResNet50, build_backbone
from features.decode import prepare_image


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", device="cpu")


def test_pretrained_lite0_ranks_the_right_imagenet_class(lite0):
    photos = np.stack([prepare_image(data.coffee()), prepare_image(data.chelsea()),
                       prepare_image(data.camera())])
    top = lite0.classify(photos).argmax(1).tolist()
    assert top[0] == 967  # espresso
    assert top[1] in (281, 282)  # tabby / tiger cat
    assert top[2] == 872  # tripod


def test_lite0_features_and_cost(lite0):
    frames = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    feats = lite0.extract(frames)
    assert feats.shape == (3, 1280) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    # batching does not change a frame's feature
    torch.testing.assert_close(lite0.extract(frames[1:2])[0], feats[1], atol=1e-4, rtol=1e-4)
    assert lite0.feature_dim == 1280 and lite0.name == "efficientnet_lite0"
    assert lite0.gmacs_per_frame == pytest.approx(0.385, abs=0.01)
    # TF-Lite normalization: mid-gray 127 maps to 0
    x = lite0.preprocess(np.full((1, 224, 224, 3), 127, np.uint8))
    assert x.abs().max().item() == 0.0


def test_resnet50_loads_a_torchvision_layout_state_dict(tmp_path):
    torch.manual_seed(0)
    source = ResNet50()
    state = source.state_dict()
    # keys torchvision's resnet50 has: spot-check the layout
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
                "layer3.5.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.bias"):
        assert key in state
    assert len(state) == 320 and sum(v.numel() for k, v in state.items()
                                      if "running" not in k and "num_batches" not in k) == 25557032
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    net = build_backbone("resnet50", weights=path, device="cpu")
    loaded = net.network.state_dict()
    torch.testing.assert_close(loaded["layer2.1.conv2.weight"], state["layer2.1.conv2.weight"])
    frames = np.zeros((2, 224, 224, 3), np.uint8)
    assert net.extract(frames).shape == (2, 2048)
    assert net.gmacs_per_frame == pytest.approx(4.09, abs=0.02)


def test_bad_weights_and_inputs_raise_clear_errors(tmp_path, lite0):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(BackboneError, match="wrong.pth.*missing keys"):
        build_backbone("resnet50", weights=wrong, device="cpu")
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("resnet50", weights=tmp_path / "absent.pth", device="cpu")
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(BackboneError, match=r"\[K, 224, 224, 3\]"):
        lite0.extract(np.zeros((1, 256, 256, 3), np.uint8))
    with pytest.raises(BackboneError, match="uint8"):
        lite0.extract(np.zeros((1, 224, 224, 3), np.float32))
