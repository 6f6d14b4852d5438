"""Built-in model zoo: well-known architectures with seeded, informative random weights.

Nothing is downloaded. Every architecture is written here with plain ``torch.nn`` and given
random weights drawn from a private generator, so ``load(name, seed=s)`` is reproducible and
leaves the global RNG untouched. The weights are chosen to be *informative* rather than
trained: Kaiming-scaled convolutions and linears, BatchNorm/LayerNorm with random gamma in
[0.5, 1.5] and small beta, and BatchNorm running statistics calibrated on random inputs, then
perturbed (mean + 0.1 std noise, variance x U[0.5, 2]) so that, as in a trained network,
eval-mode BatchNorm roughly normalises. Outputs therefore depend on the input, are far from
constant and stay in a sane numeric range through the full depth, which is what compiler
correctness and performance tests need.

Models (FP32, static shapes, batch 1):

============  =============================  ==================================================
name          inputs                         architecture
============  =============================  ==================================================
bert          input_ids int64 (1, 128)       6-layer post-LN BERT encoder, hidden 384, 6 heads,
                                             FFN 1536, exact (erf) GELU, vocab 8192; output is
                                             the last hidden state (1, 128, 384)
crnn          (1, 1, 32, 128)                CRNN text recognizer: 3 conv-bn-relu stages with
                                             max-pooling, columns as a sequence (Shape/Reshape/
                                             Transpose in ONNX), bidirectional LSTM (hidden 64),
                                             linear CTC head, log-softmax -> (32, 1, 37)
dbnet         (1, 3, 256, 256)               DB-style text detector: conv backbone, FPN with
                                             ConvTranspose, nearest and bilinear upsampling,
                                             probability and threshold heads (ConvTranspose x2,
                                             sigmoid) -> (1, 2, 256, 256)
efficientnet  (1, 3, 224, 224)               EfficientNet-B0's seven MBConv stages (SiLU,
                                             squeeze-excitation), one block each -> (1, 1000)
lstm          (1, 10, 16)                    1-layer LSTM (hidden 32, batch_first) + Linear on
                                             the last step -> (1, 10)
mlp           (1, 64)                        Linear-GELU-Linear-ReLU-Linear -> (1, 10)
mobilenetv2   (1, 3, 224, 224)               MobileNetV2, width 1.0, ReLU6 -> (1, 1000)
mobilenetv3   (1, 3, 224, 224)               MobileNetV3-Small: hard-swish, squeeze-excitation
                                             with hard-sigmoid gates -> (1, 1000)
resnet18      (1, 3, 224, 224)               ResNet-18 (BasicBlock [2, 2, 2, 2]) -> (1, 1000)
rnet          (1, 3, 24, 24)                 MTCNN R-Net face-detection stage: conv/PReLU/max-pool
                                             x3, Linear-PReLU -> face probability (1, 2) and
                                             box regression (1, 4)
streaming_vad chunk (1, 512), h (1, 64),     streaming 1-D conv encoder + one LSTMCell step:
              c (1, 64)                      (logits (1, 2), h' (1, 64), c' (1, 64))
tiny_cnn      (1, 3, 32, 32)                 conv-bn-relu x3 (one depthwise, one strided),
                                             residual add, global avgpool, Linear -> (1, 10)
vit           (1, 3, 224, 224)               ViT-Tiny-style: 16x16 patch embedding, class token,
                                             position embedding, 2 pre-norm GELU encoder layers
                                             (nn.TransformerEncoder, 192 wide, 3 heads) -> (1, 1000)
yolo          (1, 3, 320, 320)               YOLOv8n: Conv/C2f/SPPF backbone, PAN neck,
                                             decoupled head with DFL decode -> (1, 84, 2100)
yolo11        (1, 3, 320, 320)               YOLO11n: C3k2 backbone, SPPF, C2PSA attention, PAN
                                             neck, head with depthwise class branch -> (1, 84, 2100)
============  =============================  ==================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from compiler.errors import KilnError, suggest

__all__ = ["UnknownModelError", "load", "names"]


class UnknownModelError(KilnError):
    """A model name that is not in the zoo."""

    def __init__(self, name: str, known: Sequence[str]):
        known = sorted(known)
        super().__init__(f"unknown model {name!r}.{suggest(name, known)} Known models: {', '.join(known)}")
        self.name = name
        self.known = known


# --------------------------------------------------------------------------------------------
# Weight initialisation
# --------------------------------------------------------------------------------------------

_RELU_GAIN = math.sqrt(2.0)


def _init_weights(model: nn.Module, gen: torch.Generator, *, linear_gain: float = _RELU_GAIN) -> None:
    """Overwrite every parameter and running statistic of ``model`` from ``gen``.

    Convolutions use Kaiming-normal (fan-in, ReLU gain); linears use ``linear_gain / sqrt(fan_in)``;
    norms get gamma in [0.5, 1.5] and beta in [-0.1, 0.1]; BatchNorm running mean is small and
    running variance lies in [0.5, 2] (:func:`_calibrate_batchnorm` then rescales both to the
    real activations); embeddings are standard normal; LSTM weights are normal with std
    ``1 / sqrt(fan_in)`` so that the gates actually switch.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, _RELU_GAIN / math.sqrt(fan_in), generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1, generator=gen)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, linear_gain / math.sqrt(m.in_features), generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1, generator=gen)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.1, 0.1, generator=gen)
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.1, 0.1, generator=gen)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 1.0, generator=gen)
            elif isinstance(m, nn.LSTM):
                for pname, p in m.named_parameters(recurse=False):
                    if pname.startswith("weight"):
                        p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
                    else:
                        p.uniform_(-0.1, 0.1, generator=gen)


def _calibrate_batchnorm(model: nn.Module, inputs: tuple[Tensor, ...], gen: torch.Generator) -> None:
    """Set every BatchNorm's running statistics from the activations it sees on ``inputs``.

    In eval mode BatchNorm does not normalise, so statistics unrelated to the real activations
    make them drift through depth (SiLU networks such as YOLO fade towards zero; residual ones
    grow). Like a trained network, each BatchNorm here gets running mean = the measured channel
    mean + 0.1 * std * N(0, 1) and running var = the measured variance * U[0.5, 2]: its output is
    close to, but not exactly, gamma * N(0, 1) + beta. One forward pass, in execution order, so
    every layer is calibrated on already-calibrated inputs.
    """

    def pre_hook(bn: nn.Module, args: tuple[Tensor, ...]) -> None:
        assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False).clamp_min(1e-4)
        noise = torch.randn(mean.shape, generator=gen)
        bn.running_mean.copy_(mean + 0.1 * var.sqrt() * noise)
        bn.running_var.copy_(var * torch.empty_like(var).uniform_(0.5, 2.0, generator=gen))

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [bn.register_forward_pre_hook(pre_hook) for bn in bns]
    if not handles:
        return
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# tiny_cnn, mlp, lstm: small models for fast tests
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyCNN(nn.Module):
    """Three conv-bn-relu stages (plain, depthwise, strided) with a residual add, then a classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_relu(3, 16)
        self.dw = _conv_bn_relu(16, 16, groups=16)
        self.down = _conv_bn_relu(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.dw(x)
        x = self.pool(self.down(x))
        return self.fc(torch.flatten(x, 1))


class MLP(nn.Module):
    """Three linear layers with GELU and ReLU in between."""

    def __init__(self, d_in: int = 64, d_hidden: int = 128, d_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class LSTMHead(nn.Module):
    """A one-layer batch-first LSTM whose last time step feeds a linear layer."""

    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 10):
        super().__init__()
        self.lstm = nn.LSTM(d_in, d_hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class RNet(nn.Module):
    """A face-detection cascade stage (MTCNN's R-Net): 24x24 crops through conv/PReLU/max-pool and a
    dense layer; a face probability (softmax over two classes) and a box regression. Tiny (3 MFLOP): its
    latency is mostly the fixed cost of a call, which is what it is in the zoo to show."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(48, 64, 2), nn.PReLU(64),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.PReLU(128))
        self.cls = nn.Linear(128, 2)
        self.box = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.fc(self.body(x))
        return torch.softmax(self.cls(h), dim=1), self.box(h)


# --------------------------------------------------------------------------------------------
# ResNet-18
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers with an identity or 1x1 conv-bn shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 for 224x224 ImageNet-style inputs."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers: list[nn.Module] = []
        c_in = 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------


def _conv_bn_relu6(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear project; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(c_in, hidden, k=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier 1.0 (the torchvision layout, without dropout)."""

    # expansion t, output channels c, repeats n, first stride s
    _SETTINGS = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        c_in = 32
        for t, c, n, s in self._SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(_conv_bn_relu6(c_in, 1280, k=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------
# YOLOv8n
# --------------------------------------------------------------------------------------------


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU (or no activation), 'same' padding."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs with an optional residual add."""

    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convolutions: split, chain ``n`` bottlenecks, concat every stage."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concatenated."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        c_mid = c_in // 2
        self.cv1 = Conv(c_in, c_mid, 1)
        self.cv2 = Conv(c_mid * 4, c_out, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """Decoupled YOLOv8 head with DFL box decoding.

    Output is ``(1, 4 + num_classes, A)``: boxes as (cx, cy, w, h) in input pixels, then class
    probabilities (sigmoid), for the ``A`` anchors of all three scales. Anchor points and strides
    are fixed buffers for the image size given at construction (static shapes).
    """

    def __init__(self, num_classes: int, channels: Sequence[int], strides: Sequence[int], image_size: int,
                 reg_max: int = 16):
        super().__init__()
        self.nc = num_classes
        self.reg_max = reg_max
        c2 = max(16, channels[0] // 4, reg_max * 4)
        c3 = max(channels[0], min(num_classes, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for c in channels
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, num_classes, 1)) for c in channels
        )
        # DFL: expectation over reg_max bins as a fixed 1x1 conv with weights 0..reg_max-1.
        dfl = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)
        self.register_buffer("dfl_weight", dfl, persistent=False)
        points, stride_rows = [], []
        for s in strides:
            n = image_size // s
            coords = torch.arange(n, dtype=torch.float32) + 0.5
            yy, xx = torch.meshgrid(coords, coords, indexing="ij")
            points.append(torch.stack((xx.flatten(), yy.flatten())))
            stride_rows.append(torch.full((1, n * n), float(s)))
        self.level_anchors = [p.shape[1] for p in points]
        self.num_anchors = sum(self.level_anchors)
        self.num_outputs = 4 * reg_max + num_classes
        self.register_buffer("anchors", torch.cat(points, 1).unsqueeze(0), persistent=False)  # (1, 2, A)
        self.register_buffer("strides", torch.cat(stride_rows, 1).unsqueeze(0), persistent=False)  # (1, 1, A)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        # Shapes are Python ints and splits have explicit sizes (no tensor.shape, flatten or chunk),
        # so the traced ONNX graph has no Shape/Gather/Slice arithmetic.
        no, a = self.num_outputs, self.num_anchors
        outs = [
            torch.cat((box(f), cls(f)), 1).view(-1, no, n)
            for f, box, cls, n in zip(feats, self.cv2, self.cv3, self.level_anchors)
        ]
        y = torch.cat(outs, 2)  # (b, 4 * reg_max + nc, A)
        box, cls = y.split((4 * self.reg_max, self.nc), 1)
        bins = box.view(-1, 4, self.reg_max, a).transpose(2, 1).softmax(1)  # (b, reg_max, 4, A)
        dist = F.conv2d(bins, self.dfl_weight).view(-1, 4, a)
        lt, rb = dist.split((2, 2), 1)
        x1y1 = self.anchors - lt
        x2y2 = self.anchors + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((boxes, cls.sigmoid()), 1)


class YOLOv8n(nn.Module):
    """YOLOv8n detector (width 0.25, depth 0.33): backbone, PAN neck, 3-scale decoupled head."""

    def __init__(self, num_classes: int = 80, image_size: int = 320):
        super().__init__()
        # backbone
        self.b0 = Conv(3, 16, 3, 2)  # P1/2
        self.b1 = Conv(16, 32, 3, 2)  # P2/4
        self.b2 = C2f(32, 32, 1, True)
        self.b3 = Conv(32, 64, 3, 2)  # P3/8
        self.b4 = C2f(64, 64, 2, True)
        self.b5 = Conv(64, 128, 3, 2)  # P4/16
        self.b6 = C2f(128, 128, 2, True)
        self.b7 = Conv(128, 256, 3, 2)  # P5/32
        self.b8 = C2f(256, 256, 1, True)
        self.b9 = SPPF(256, 256, 5)
        # neck: top-down then bottom-up
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h12 = C2f(256 + 128, 128, 1)
        self.h15 = C2f(128 + 64, 64, 1)  # P3 out
        self.h16 = Conv(64, 64, 3, 2)
        self.h18 = C2f(64 + 128, 128, 1)  # P4 out
        self.h19 = Conv(128, 128, 3, 2)
        self.h21 = C2f(128 + 256, 256, 1)  # P5 out
        self.detect = Detect(num_classes, (64, 128, 256), (8, 16, 32), image_size)

    def forward(self, x: Tensor) -> Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        n4 = self.h12(torch.cat((self.up(p5), p4), 1))
        o3 = self.h15(torch.cat((self.up(n4), p3), 1))
        o4 = self.h18(torch.cat((self.h16(o3), n4), 1))
        o5 = self.h21(torch.cat((self.h19(o4), p5), 1))
        return self.detect((o3, o4, o5))


# --------------------------------------------------------------------------------------------
# YOLO11n: C3k2 blocks, C2PSA attention after SPPF, depthwise classification head
# --------------------------------------------------------------------------------------------


class Bottleneck11(nn.Module):
    """Ultralytics' bottleneck: 3x3 Conv to ``e * c_out`` channels, 3x3 Conv back, residual add."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        c_mid = int(c_out * e)
        self.cv1 = Conv(c_in, c_mid, 3)
        self.cv2 = Conv(c_mid, c_out, 3)
        self.add = shortcut and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3k(nn.Module):
    """CSP block with two branches, ``n`` full-width bottlenecks on one of them."""

    def __init__(self, c_in: int, c_out: int, n: int = 2, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        c_mid = int(c_out * e)
        self.cv1 = Conv(c_in, c_mid, 1)
        self.cv2 = Conv(c_in, c_mid, 1)
        self.cv3 = Conv(2 * c_mid, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck11(c_mid, c_mid, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k2(nn.Module):
    """YOLO11's C2f variant: split, chain ``n`` bottlenecks (or C3k blocks), concat every stage."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, c3k: bool = False, e: float = 0.5):
        super().__init__()
        self.c = int(c_out * e)
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(C3k(self.c, self.c, 2) if c3k else Bottleneck11(self.c, self.c) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class PositionAttention(nn.Module):
    """YOLO11's attention over the pixels of a feature map: q, k, v from one 1x1 Conv, softmax over
    positions, plus a depthwise 3x3 positional encoding of v."""

    def __init__(self, dim: int, num_heads: int, attn_ratio: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, groups=dim, act=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w).split(
            (self.key_dim, self.key_dim, self.head_dim), 2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(-1)
        y = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(y)


class C2PSA(nn.Module):
    """Split the channels; one half through ``n`` attention + feed-forward blocks with residuals."""

    def __init__(self, c: int, n: int = 1):
        super().__init__()
        self.c = c // 2
        self.cv1 = Conv(c, 2 * self.c, 1)
        self.cv2 = Conv(2 * self.c, c, 1)
        self.attn = nn.ModuleList(PositionAttention(self.c, max(1, self.c // 64)) for _ in range(n))
        self.ffn = nn.ModuleList(nn.Sequential(Conv(self.c, 2 * self.c, 1), Conv(2 * self.c, self.c, 1, act=False))
                                 for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        for attn, ffn in zip(self.attn, self.ffn):
            b = b + attn(b)
            b = b + ffn(b)
        return self.cv2(torch.cat((a, b), 1))


class Detect11(Detect):
    """YOLO11's head: YOLOv8's, with depthwise-separable convolutions in the classification branch."""

    def __init__(self, num_classes: int, channels: Sequence[int], strides: Sequence[int], image_size: int):
        super().__init__(num_classes, channels, strides, image_size)
        c3 = max(channels[0], min(num_classes, 100))
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(c, c, 3, groups=c), Conv(c, c3, 1), Conv(c3, c3, 3, groups=c3), Conv(c3, c3, 1),
                          nn.Conv2d(c3, num_classes, 1))
            for c in channels
        )


class YOLO11n(nn.Module):
    """YOLO11n detector (width 0.25, depth 0.5): C3k2 backbone, SPPF, C2PSA, PAN neck, 3-scale head."""

    def __init__(self, num_classes: int = 80, image_size: int = 320):
        super().__init__()
        self.b0 = Conv(3, 16, 3, 2)  # P1/2
        self.b1 = Conv(16, 32, 3, 2)  # P2/4
        self.b2 = C3k2(32, 64, 1, False, 0.25)
        self.b3 = Conv(64, 64, 3, 2)  # P3/8
        self.b4 = C3k2(64, 128, 1, False, 0.25)
        self.b5 = Conv(128, 128, 3, 2)  # P4/16
        self.b6 = C3k2(128, 128, 1, True)
        self.b7 = Conv(128, 256, 3, 2)  # P5/32
        self.b8 = C3k2(256, 256, 1, True)
        self.b9 = SPPF(256, 256, 5)
        self.b10 = C2PSA(256, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h13 = C3k2(256 + 128, 128, 1, False)
        self.h16 = C3k2(128 + 128, 64, 1, False)  # P3 out
        self.h17 = Conv(64, 64, 3, 2)
        self.h19 = C3k2(64 + 128, 128, 1, False)  # P4 out
        self.h20 = Conv(128, 128, 3, 2)
        self.h22 = C3k2(128 + 256, 256, 1, True)  # P5 out
        self.detect = Detect11(num_classes, (64, 128, 256), (8, 16, 32), image_size)

    def forward(self, x: Tensor) -> Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b10(self.b9(self.b8(self.b7(p4))))
        n4 = self.h13(torch.cat((self.up(p5), p4), 1))
        o3 = self.h16(torch.cat((self.up(n4), p3), 1))
        o4 = self.h19(torch.cat((self.h17(o3), n4), 1))
        o5 = self.h22(torch.cat((self.h20(o4), p5), 1))
        return self.detect((o3, o4, o5))


# --------------------------------------------------------------------------------------------
# MobileNetV3-Small and EfficientNet-B0: squeeze-excitation, hard-swish, SiLU
# --------------------------------------------------------------------------------------------


def _divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to a multiple of ``divisor``, not below 90 % of ``v`` (the MobileNet convention)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class SqueezeExcite(nn.Module):
    """Global average pool, a bottleneck of two 1x1 convolutions, a gate that scales the channels."""

    def __init__(self, c: int, c_squeeze: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c_squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(c_squeeze, c, 1)
        self.gate = gate()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


def _conv_bn_act(c_in: int, c_out: int, k: int, stride: int, act: type[nn.Module] | None,
                 groups: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual with squeeze-excitation: 1x1 expand, kxk depthwise, SE, 1x1 project, residual
    add when the shape allows (MobileNetV3's and EfficientNet's block)."""

    def __init__(self, c_in: int, k: int, c_exp: int, c_out: int, stride: int, act: type[nn.Module],
                 c_squeeze: int | None, gate: type[nn.Module]):
        super().__init__()
        layers: list[nn.Module] = []
        if c_exp != c_in:
            layers.append(_conv_bn_act(c_in, c_exp, 1, 1, act))
        layers.append(_conv_bn_act(c_exp, c_exp, k, stride, act, groups=c_exp))
        if c_squeeze:
            layers.append(SqueezeExcite(c_exp, c_squeeze, nn.ReLU if act is nn.Hardswish or act is nn.ReLU else act,
                                        gate))
        layers.append(_conv_bn_act(c_exp, c_out, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small (width 1.0): hard-swish, squeeze-excitation with hard-sigmoid gates."""

    # kernel, expanded channels, out channels, SE, activation ("RE" ReLU, "HS" hard-swish), stride
    CONFIG = ((3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
              (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
              (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
              (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 16, 3, 2, nn.Hardswish)]
        c = 16
        for k, c_exp, c_out, se, act, stride in self.CONFIG:
            layers.append(MBConv(c, k, c_exp, c_out, stride, nn.ReLU if act == "RE" else nn.Hardswish,
                                 _divisible(c_exp / 4) if se else None, nn.Hardsigmoid))
            c = c_out
        layers.append(_conv_bn_act(c, 576, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EfficientNet(nn.Module):
    """EfficientNet-B0's seven stages (SiLU, squeeze-excitation with sigmoid gates), one block per stage
    (B0 repeats them 1, 2, 2, 3, 3, 4, 1 times), stem and 1280-channel head."""

    # expand ratio, kernel, stride, in channels, out channels
    CONFIG = ((1, 3, 1, 32, 16), (6, 3, 2, 16, 24), (6, 5, 2, 24, 40), (6, 3, 2, 40, 80), (6, 5, 1, 80, 112),
              (6, 5, 2, 112, 192), (6, 3, 1, 192, 320))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 32, 3, 2, nn.SiLU)]
        for expand, k, stride, c_in, c_out in self.CONFIG:
            layers.append(MBConv(c_in, k, c_in * expand, c_out, stride, nn.SiLU, max(1, c_in // 4), nn.Sigmoid))
        layers.append(_conv_bn_act(320, 1280, 1, 1, nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# --------------------------------------------------------------------------------------------
# ViT: patch embedding, class token, position embedding, pre-norm transformer encoder
# --------------------------------------------------------------------------------------------


class ViT(nn.Module):
    """A ViT-Tiny-style classifier: 16x16 patches of a 224x224 image embedded to 192 channels, class
    token and learned position embedding, ``nn.TransformerEncoder`` (pre-norm, GELU, 3 heads), head."""

    def __init__(self, dim: int = 192, depth: int = 2, heads: int = 3, num_classes: int = 1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 16, stride=16)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 197, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch(x).flatten(2).transpose(1, 2)
        p = torch.cat([self.cls.expand(x.shape[0], -1, -1), p], 1) + self.pos
        return self.head(self.norm(self.encoder(p))[:, 0])


def _build_vit(gen: torch.Generator) -> nn.Module:
    model = ViT()
    _init_weights(model, gen, linear_gain=1.0)
    with torch.no_grad():  # what _init_weights does not reach: attention's packed projections, tokens
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.normal_(0.0, 1.0 / math.sqrt(m.embed_dim), generator=gen)
                m.in_proj_bias.uniform_(-0.1, 0.1, generator=gen)
        model.cls.normal_(0.0, 0.5, generator=gen)
        model.pos.normal_(0.0, 0.5, generator=gen)
    return model


# --------------------------------------------------------------------------------------------
# BERT encoder
# --------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention from plain linears, matmul and softmax (no mask)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        q = self.query(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(ctx.transpose(1, 2).reshape(b, s, h))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.fc1 = nn.Linear(hidden, ffn)
        self.act = nn.GELU()  # exact (erf) GELU, as in the original BERT
        self.fc2 = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(self.act(self.fc1(x))))


class BertEncoder(nn.Module):
    """Small BERT: token + learned position embeddings, LayerNorm, post-LN encoder layers.

    Takes ``input_ids`` (int64, (batch, seq)) and returns the last hidden state. There is no
    token-type embedding and no attention mask (every token attends to every token).
    """

    def __init__(self, vocab: int = 8192, hidden: int = 384, layers: int = 6, heads: int = 6, ffn: int = 1536,
                 max_positions: int = 512):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, input_ids: Tensor) -> Tensor:
        seq = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:seq].unsqueeze(0)
        x = self.ln(x)
        for layer in self.layers:
            x = layer(x)
        return x


# --------------------------------------------------------------------------------------------
# CRNN text recognizer
# --------------------------------------------------------------------------------------------


class CRNN(nn.Module):
    """CNN + bidirectional LSTM + CTC-style linear head, for 32-pixel-high text lines.

    Three conv-bn-relu stages with max-pooling (2x2, 2x2, 2x1) turn a (1, 1, 32, 128) line into a
    (1, 96, 4, 32) map; its columns become a sequence (``view(b, c * h, w).permute(2, 0, 1)``: the
    shape arithmetic ONNX exports carry as Shape/Gather/Reshape/Transpose) for a bidirectional LSTM,
    and a linear layer gives per-column log-probabilities over 36 characters and the CTC blank:
    (32, 1, 37), time first as CTC losses take them.
    """

    def __init__(self, classes: int = 37, hidden: int = 64):
        super().__init__()
        self.cnn = nn.Sequential(
            _conv_bn_relu(1, 32), nn.MaxPool2d(2),
            _conv_bn_relu(32, 64), nn.MaxPool2d(2),
            _conv_bn_relu(64, 96), nn.MaxPool2d((2, 1)),
        )
        self.rnn = nn.LSTM(96 * 4, hidden, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        f = self.cnn(x)
        b, c, h, w = f.shape
        seq = f.view(b, c * h, w).permute(2, 0, 1)  # (width, batch, features)
        out, _ = self.rnn(seq)
        return F.log_softmax(self.head(out), dim=2)


def _build_crnn(gen: torch.Generator) -> nn.Module:
    model = CRNN()
    _init_weights(model, gen, linear_gain=1.0)  # gain 1: the head's logits stay around unit scale
    return model


# --------------------------------------------------------------------------------------------
# Streaming 1-D conv + LSTMCell with state in and out
# --------------------------------------------------------------------------------------------


class StreamingVAD(nn.Module):
    """A streaming voice-activity-style model: one audio chunk and the LSTM state in, the chunk's
    logits and the next state out (as Silero VAD runs: the caller feeds ``h``, ``c`` back).

    Three strided 1-D convolutions encode the (1, 512) chunk into 64 channels, averaged over time;
    one ``LSTMCell`` step updates the state; a linear layer gives 2 logits. Inputs ``(chunk, h, c)``,
    outputs ``(logits (1, 2), h' (1, 64), c' (1, 64))``.
    """

    def __init__(self, channels: int = 64, hidden: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv1d(1, channels, 64, stride=32, padding=16), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.cell = nn.LSTMCell(channels, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, chunk: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat = self.encoder(chunk.unsqueeze(1)).mean(dim=2)
        h, c = self.cell(feat, (h, c))
        return self.head(torch.relu(h)), h, c


def _build_streaming_vad(gen: torch.Generator) -> nn.Module:
    """Seeded weights: Kaiming-scaled 1-D convolutions, LSTMCell weights with std 1/sqrt(fan_in) so
    the gates switch, and the linears as :func:`_init_weights` draws them."""
    model = StreamingVAD()
    _init_weights(model, gen)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv1d):
                m.weight.normal_(0.0, _RELU_GAIN / math.sqrt(m.weight[0].numel()), generator=gen)
                m.bias.uniform_(-0.1, 0.1, generator=gen)
            elif isinstance(m, nn.LSTMCell):
                for pname, p in m.named_parameters(recurse=False):
                    if pname.startswith("weight"):
                        p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
                    else:
                        p.uniform_(-0.1, 0.1, generator=gen)
    return model


def _streaming_vad_inputs(gen: torch.Generator) -> tuple[Tensor, ...]:
    """A chunk of 512 samples and a state as the previous chunk would leave it (|h| < 1, c small)."""
    return (torch.randn(1, 512, generator=gen), 0.5 * torch.tanh(torch.randn(1, 64, generator=gen)),
            0.5 * torch.randn(1, 64, generator=gen))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# dbnet: a DB-style text detector (learned and fixed upsampling)
# --------------------------------------------------------------------------------------------


class DBNet(nn.Module):
    """A DB-style (differentiable binarization) text detector for a 256x256 image.

    A small conv-bn-relu backbone (strides 4, 8, 16, 32; 24-64 channels); an FPN whose top-down path
    upsamples with a 2x2 stride-2 ``ConvTranspose2d``, nearest and bilinear resizes, each level
    smoothed to 16 channels and brought to stride 4 (nearest x4, bilinear x2...), concatenated; and
    two DB heads, probability and threshold, each conv3x3-bn-relu -> ConvTranspose x2 (bn-relu
    between) -> sigmoid, back to the input resolution. Output ``(1, 2, 256, 256)``: the probability
    and threshold maps."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(3, 16, stride=2), _conv_bn_relu(16, 24, stride=2))  # /4
        self.c3 = nn.Sequential(_conv_bn_relu(24, 32, stride=2), _conv_bn_relu(32, 32))  # /8
        self.c4 = nn.Sequential(_conv_bn_relu(32, 48, stride=2), _conv_bn_relu(48, 48))  # /16
        self.c5 = nn.Sequential(_conv_bn_relu(48, 64, stride=2), _conv_bn_relu(64, 64))  # /32
        self.inner = nn.ModuleList(nn.Conv2d(c, width, 1, bias=False) for c in (24, 32, 48, 64))
        self.up5 = nn.ConvTranspose2d(width, width, 2, stride=2)  # learned upsampling /32 -> /16
        self.smooth = nn.ModuleList(nn.Conv2d(width, width // 4, 3, padding=1, bias=False) for _ in range(4))
        self.prob = self._head(width)
        self.thresh = self._head(width)

    @staticmethod
    def _head(width: int) -> nn.Sequential:
        mid = width // 4
        return nn.Sequential(
            nn.Conv2d(width, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.ConvTranspose2d(mid, mid, 2, stride=2), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.ConvTranspose2d(mid, 1, 2, stride=2), nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        import torch.nn.functional as F

        c2 = self.stem(x)
        c3 = self.c3(c2)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        in2, in3, in4, in5 = (conv(c) for conv, c in zip(self.inner, (c2, c3, c4, c5)))
        p4 = in4 + self.up5(in5)
        p3 = in3 + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        p2 = in2 + F.interpolate(p3, scale_factor=2.0, mode="bilinear", align_corners=False)
        s2, s3, s4, s5 = (conv(p) for conv, p in zip(self.smooth, (p2, p3, p4, in5)))
        fuse = torch.cat([
            s2,
            F.interpolate(s3, scale_factor=2.0, mode="bilinear", align_corners=False),
            F.interpolate(s4, scale_factor=4.0, mode="nearest"),
            F.interpolate(s5, scale_factor=8.0, mode="nearest"),
        ], 1)
        return torch.cat([self.prob(fuse), self.thresh(fuse)], 1)


def _build_dbnet(gen: torch.Generator) -> nn.Module:
    model = DBNet()
    _init_weights(model, gen)
    with torch.no_grad():  # transposed convolutions: Kaiming over the taps that reach one output
        for m in model.modules():
            if isinstance(m, nn.ConvTranspose2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                fan_in /= m.stride[0] * m.stride[1]
                # the heads' last layer feeds a sigmoid: keep its logits around unit scale
                gain = 0.5 if m.out_channels == 1 else _RELU_GAIN
                m.weight.normal_(0.0, gain / math.sqrt(fan_in), generator=gen)
                m.bias.uniform_(-0.1, 0.1, generator=gen)
    return model


_BERT_VOCAB = 8192
# Example inputs per BatchNorm calibration pass: enough that the statistics also hold for
# inputs the calibration never saw (one image under-estimates the variance of deep, low-res maps).
_CALIBRATION_BATCH = 4


def _image(size: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda gen: (torch.randn(1, 3, size, size, generator=gen),)


def _build_bert(gen: torch.Generator) -> nn.Module:
    model = BertEncoder(vocab=_BERT_VOCAB)
    # Gain 1 keeps attention logits around unit scale: softmax is neither uniform nor one-hot.
    _init_weights(model, gen, linear_gain=1.0)
    return model


def _plain(factory: Callable[[], nn.Module]) -> Callable[[torch.Generator], nn.Module]:
    def build(gen: torch.Generator) -> nn.Module:
        model = factory()
        _init_weights(model, gen)
        return model

    return build


@dataclass(frozen=True)
class _Entry:
    build: Callable[[torch.Generator], nn.Module]
    inputs: Callable[[torch.Generator], tuple[Tensor, ...]]


_MODELS: dict[str, _Entry] = {
    "bert": _Entry(_build_bert, lambda gen: (torch.randint(0, _BERT_VOCAB, (1, 128), generator=gen),)),
    "crnn": _Entry(_build_crnn, lambda gen: (torch.randn(1, 1, 32, 128, generator=gen),)),
    "dbnet": _Entry(_build_dbnet, _image(256)),
    "lstm": _Entry(_plain(LSTMHead), lambda gen: (torch.randn(1, 10, 16, generator=gen),)),
    "mlp": _Entry(_plain(MLP), lambda gen: (torch.randn(1, 64, generator=gen),)),
    "efficientnet": _Entry(_plain(EfficientNet), _image(224)),
    "mobilenetv2": _Entry(_plain(MobileNetV2), _image(224)),
    "mobilenetv3": _Entry(_plain(MobileNetV3Small), _image(224)),
    "resnet18": _Entry(_plain(ResNet18), _image(224)),
    "rnet": _Entry(_plain(RNet), _image(24)),
    "streaming_vad": _Entry(_build_streaming_vad, _streaming_vad_inputs),
    "tiny_cnn": _Entry(_plain(TinyCNN), _image(32)),
    "vit": _Entry(_build_vit, _image(224)),
    "yolo": _Entry(_plain(YOLOv8n), _image(320)),
    "yolo11": _Entry(_plain(YOLO11n), _image(320)),
}


def names() -> list[str]:
    """All model names in the zoo, sorted."""
    return sorted(_MODELS)


def load(name: str, *, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Build model ``name`` with weights drawn from ``seed``; return it in eval mode with example inputs.

    The same ``(name, seed)`` always gives the same weights and inputs. The global RNG state is
    left as it was. Raises :class:`UnknownModelError` for a name not in :func:`names`.
    """
    entry = _MODELS.get(name)
    if entry is None:
        raise UnknownModelError(name, _MODELS)
    gen = torch.Generator().manual_seed(seed)
    # Module constructors run PyTorch's default init on the global RNG; keep that private.
    with torch.random.fork_rng(devices=[]):
        model = entry.build(gen)
    calib = [entry.inputs(gen) for _ in range(_CALIBRATION_BATCH)]
    _calibrate_batchnorm(model, tuple(torch.cat(xs) for xs in zip(*calib)), gen)
    inputs = entry.inputs(gen)
    return model.eval(), inputs
