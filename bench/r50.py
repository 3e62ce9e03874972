"""The benchmarks' model: FCOS-R50 (mmdet R50-caffe layout, no-GN head, 80 classes), random weights.

BN statistics come from the real activations on a calibration batch (perturbed, so BN matters) and
the head's last convs are rescaled so their outputs have chosen statistics: box distances
exp(N(3.2, 0.35)) ~ 10-100 px, centerness N(0, 1.5), cls logits N(cls_mean, cls_std) — which sets
how many (point, class) pairs pass the 0.05 score threshold and reach NMS.
"""

from __future__ import annotations

import numpy as np


def build_r50(
    seed: int,
    calib: np.ndarray,
    cls_mean: float = -5.5,
    cls_std: float = 0.8,
    cls_jitter: float = 0.3,
    he_init: bool = True,
    head_norm: str = "none",
):
    """Eval-mode FCOS-R50 calibrated on ``calib`` (``[B,3,H,W]`` preprocessed float32).

    ``head_norm="gn"`` builds the model zoo's GN=Y sibling instead (head convs without bias, each
    followed by GroupNorm(32) with random affine: ``fcos_r50_caffe_fpn_gn_1x_4gpu``, 36.7 AP).
    """
    import dataclasses

    import torch

    from fcos_offline.model.backbone import FrozenBatchNorm2d
    from fcos_offline.model.config import DetectorConfig
    from fcos_offline.model.detector import Detector

    torch.manual_seed(seed)
    cfg = DetectorConfig()
    if head_norm == "gn":
        cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, norm="gn", conv_bias=False))
    model = Detector(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    if he_init:  # keeps activations in range through 50 layers
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, generator=gen, nonlinearity="relu")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))

    def rand(n: int, lo: float, hi: float):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    def bn_hook(module, inputs):  # running stats from the real input statistics, perturbed
        t = inputs[0].detach()
        mean, var = t.mean(dim=(0, 2, 3)), t.var(dim=(0, 2, 3)) + 1e-3
        n = mean.numel()
        module.weight.copy_(rand(n, 0.5, 1.5))
        module.bias.copy_(rand(n, -0.3, 0.3))
        module.running_mean.copy_(mean + rand(n, -0.5, 0.5) * var.sqrt())
        module.running_var.copy_(var * rand(n, 0.5, 2.0))

    x = torch.from_numpy(calib)
    handles = [m.register_forward_pre_hook(bn_hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    head = model.bbox_head
    captured: dict[str, list] = {"cls": [], "ctr": [], "reg": []}
    hooks = [
        head.conv_cls.register_forward_hook(lambda m, i, o: captured["cls"].append(o)),
        head.conv_centerness.register_forward_hook(lambda m, i, o: captured["ctr"].append(o)),
        head.conv_reg.register_forward_hook(lambda m, i, o: captured["reg"].append(o)),
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    num_classes = head.conv_cls.out_channels
    targets = (
        (head.conv_cls, "cls", cls_std, cls_mean + cls_jitter * torch.randn(num_classes, generator=gen)),
        (head.conv_centerness, "ctr", 1.5, torch.zeros(1)),
        (head.conv_reg, "reg", 0.35, torch.full((4,), 3.2)),
    )
    with torch.no_grad():
        for conv, name, std, mean in targets:
            flat = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in captured[name]], dim=1)
            k = std / flat.std(dim=1).clamp_min(1e-6)
            conv.weight.mul_(k.reshape(-1, 1, 1, 1))
            conv.bias.copy_(mean - flat.mean(dim=1) * k + conv.bias * k)
    return model


def set_candidates(model, calib: np.ndarray, per_image: float) -> float:
    """Shift the cls bias so ``per_image`` (point, class) pairs of ``calib`` pass the 0.05 score threshold.

    What reaches NMS decides its cost: a trained FCOS gives about 1-3k such pairs per COCO photo,
    random weights tens of thousands. Returns the count reached (pairs per image).
    """
    import torch

    with torch.no_grad():
        cls, _, _ = model(torch.from_numpy(calib))
        logits = torch.cat([c.flatten() for c in cls]).sort(descending=True).values
        k = int(min(len(logits) - 1, max(1, per_image * calib.shape[0])))
        threshold = float(np.log(0.05 / 0.95))  # sigmoid(x) > 0.05
        model.bbox_head.conv_cls.bias.add_(threshold - float(logits[k]) + 1e-4)  # the k-th largest logit lands just above it
        cls, _, _ = model(torch.from_numpy(calib))
    return float(sum((c.sigmoid() > 0.05).sum().item() for c in cls)) / calib.shape[0]
