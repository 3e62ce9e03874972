"""The benchmarks' model: FCOS-R50 (mmdet R50-caffe layout, no-GN head, 80 classes), random weights;
``family="retinanet"`` / ``"atss"`` give mmdet's RetinaNet-R50 / ATSS-R50 (pytorch style, their FPN and head).

BN statistics come from the real activations on a calibration batch (perturbed, so BN matters) and
the head's prediction convs are rescaled so their outputs have chosen statistics: FCOS box distances
exp(N(3.2, 0.35)) ~ 10-100 px, anchor deltas N(0, 0.3) after the coder's stds, centerness N(0, 1.5),
cls logits N(cls_mean, cls_std) — which sets how many (prior, class) pairs pass the 0.05 score
threshold and reach NMS.
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
    family: str = "fcos",
):
    """Eval-mode FCOS-R50 calibrated on ``calib`` (``[B,3,H,W]`` preprocessed float32).

    ``head_norm="gn"`` builds the model zoo's GN=Y sibling instead (head convs without bias, each
    followed by GroupNorm(32) with random affine: ``fcos_r50_caffe_fpn_gn_1x_4gpu``, 36.7 AP).
    """
    import dataclasses

    import torch

    from fcos_offline.model.backbone import FrozenBatchNorm2d
    from fcos_offline.model.checkpoint import ANCHOR_DEFAULTS
    from fcos_offline.model.config import DetectorConfig
    from fcos_offline.model.detector import Detector
    from fcos_offline.model.heads.spec import head_spec

    torch.manual_seed(seed)
    cfg = DetectorConfig()
    if family != "fcos":  # mmdet's RetinaNet / ATSS R50: pytorch style, P6 from C5 (RetinaNet) or P5, no ReLU before P7
        head_norm = "gn" if family == "atss" else head_norm
        cfg.backbone.style = "pytorch"
        cfg.neck = dataclasses.replace(cfg.neck, extra_on="input" if family == "retinanet" else "output", relu_before_extra=False)
        cfg.head = dataclasses.replace(cfg.head, family=family, use_scale=family == "atss", **ANCHOR_DEFAULTS[family])
        cfg.post.iou_thr = 0.6 if family == "atss" else 0.5
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
    spec = head_spec(family)
    convs = {kind: getattr(head, name) for kind, name in spec.convs.items()}
    captured: dict[str, list] = {kind: [] for kind in convs}
    hooks = [conv.register_forward_hook(lambda m, i, o, kind=kind: captured[kind].append(o)) for kind, conv in convs.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    num_classes = convs["cls"].out_channels
    n_reg = convs["reg"].out_channels
    if spec.coder == "distance":
        reg_std, reg_mean = torch.tensor(0.35), torch.full((4,), 3.2)
    else:  # deltas of about 0.3 after the coder's stds: boxes near their anchors
        reg_std, reg_mean = 0.3 / torch.tensor(cfg.head.target_stds).repeat(n_reg // 4), torch.zeros(n_reg)
    targets = [
        (convs["cls"], "cls", torch.tensor(cls_std), cls_mean + cls_jitter * torch.randn(num_classes, generator=gen)),
        (convs["reg"], "reg", reg_std, reg_mean),
    ]
    if "ctr" in convs:
        targets.append((convs["ctr"], "ctr", torch.tensor(1.5), torch.zeros(convs["ctr"].out_channels)))
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

    from fcos_offline.model.heads.spec import head_spec

    conv_cls = getattr(model.bbox_head, head_spec(model.cfg.head.family).convs["cls"])
    with torch.no_grad():
        cls = model(torch.from_numpy(calib))[0]
        logits = torch.cat([c.flatten() for c in cls]).sort(descending=True).values
        k = int(min(len(logits) - 1, max(1, per_image * calib.shape[0])))
        threshold = float(np.log(0.05 / 0.95))  # sigmoid(x) > 0.05
        conv_cls.bias.add_(threshold - float(logits[k]) + 1e-4)  # the k-th largest logit lands just above it
        cls = model(torch.from_numpy(calib))[0]
    return float(sum((c.sigmoid() > 0.05).sum().item() for c in cls)) / calib.shape[0]
