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
dbnet         (1, 3, 256, 256)               DB-style text detector: conv backbone, FPN with
                                             ConvTranspose, nearest and bilinear upsampling,
                                             probability and threshold heads (ConvTranspose x2,
                                             sigmoid) -> (1, 2, 256, 256)
lstm          (1, 10, 16)                    1-layer LSTM (hidden 32, batch_first) + Linear on
                                             the last step -> (1, 10)
mlp           (1, 64)                        Linear-GELU-Linear-ReLU-Linear -> (1, 10)
mobilenetv2   (1, 3, 224, 224)               MobileNetV2, width 1.0, ReLU6 -> (1, 1000)
resnet18      (1, 3, 224, 224)               ResNet-18 (BasicBlock [2, 2, 2, 2]) -> (1, 1000)
tiny_cnn      (1, 3, 32, 32)                 conv-bn-relu x3 (one depthwise, one strided),
                                             residual add, global avgpool, Linear -> (1, 10)
yolo          (1, 3, 320, 320)               YOLOv8n: Conv/C2f/SPPF backbone, PAN neck,
                                             decoupled head with DFL decode -> (1, 84, 2100)
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
    """Conv2d (no bias) + BatchNorm + SiLU, 'same' padding."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU(inplace=True)

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
    "dbnet": _Entry(_build_dbnet, _image(256)),
    "lstm": _Entry(_plain(LSTMHead), lambda gen: (torch.randn(1, 10, 16, generator=gen),)),
    "mlp": _Entry(_plain(MLP), lambda gen: (torch.randn(1, 64, generator=gen),)),
    "mobilenetv2": _Entry(_plain(MobileNetV2), _image(224)),
    "resnet18": _Entry(_plain(ResNet18), _image(224)),
    "tiny_cnn": _Entry(_plain(TinyCNN), _image(32)),
    "yolo": _Entry(_plain(YOLOv8n), _image(320)),
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
