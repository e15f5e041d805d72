"""
The FID Inception-v3: the network of TensorFlow's FID code (the 2015-12-05 Inception graph) as
ported to PyTorch by pytorch-fid (its FIDInceptionA/C/E_1/E_2 blocks on torchvision's Inception3),
hand-written here so FID needs pytorch-fid's weights file but not the package. It maps RGB
images in [0, 1] to the 2048-d pool3 features whose mean and covariance evaluate.py's FID compares.

Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which the user downloads once
(github.com/mseitzer/pytorch-fid releases) and passes to `python evaluate.py fid --inception PATH`.
Module names follow torchvision's Inception3 (Conv2d_1a_3x3 ... Conv2d_4a_3x3, Mixed_5b ...
Mixed_7c with their branch* units, each a .conv and a .bn, and the unused 1008-way fc), so the
file's keys, e.g. "Mixed_5b.branch1x1.conv.weight", load one to one; load_fid_inception checks
every key and shape and names the first one that differs.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError, error_summary

FID_IMAGE_SIZE = 299  # the Inception's input size


class BasicConv2d(nn.Module):
    """Conv (no bias) -> batch norm -> ReLU, torchvision's unit; eps 1e-3 is TensorFlow's."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TensorFlow leaves the zero padding out of the average (pytorch-fid's FIDInception* patch)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-5d (35x35): pytorch-fid's FIDInceptionA."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b-6e (17x17), 7x7 convolutions factored into 1x7 and 7x1: pytorch-fid's FIDInceptionC."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = BasicConv2d(c7, c7, **row), BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = BasicConv2d(c7, c7, **col), BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = BasicConv2d(c7, c7, **col), BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b and 7c (8x8): pytorch-fid's FIDInceptionE_1 (pool="avg") and FIDInceptionE_2 (pool="max")."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # the last block of the TensorFlow graph max-pools where every other block averages; FID
        # has kept that quirk, so numbers stay comparable across papers
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The FID Inception-v3 up to its 2048-d pool3 features. Module names follow torchvision's
    Inception3, so the state dict keys are those of pt_inception-2015-12-05-6726825d.pth."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        # the 1008-way ImageNet head: unused by FID, kept so the weights file loads key for key
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) RGB in [0, 1] -> pool3 features (B, 2048). Like pytorch-fid, resizes to
        299x299 (bilinear, no antialiasing) and scales to [-1, 1]."""
        if x.shape[-2:] != (FID_IMAGE_SIZE, FID_IMAGE_SIZE):
            x = F.interpolate(x, size=(FID_IMAGE_SIZE, FID_IMAGE_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ends at (B, 2048, 8, 8)
        return x.mean((2, 3))  # (B, 2048)


def load_fid_inception(path: str | Path) -> FIDInception:
    """FIDInception with the weights of `path`, in eval mode on the CPU.

    Keys and shapes must match exactly; `num_batches_tracked` (batch-norm bookkeeping, unused in
    eval) may be absent. Raises UserError naming the file and the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: Inception weights not found (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling fails in many ways (EOFError, UnpicklingError, RuntimeError, ...)
        raise UserError(f"{path}: not a PyTorch weights file ({error_summary(e)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, got {type(state).__name__}")
    with torch.device("meta"):  # shapes only: no memory, no random init for weights about to be replaced
        model = FIDInception()
    ours = model.state_dict()
    for key, value in state.items():
        if key not in ours:
            raise UserError(f"{path}: unexpected key {key!r}; not the FID Inception weights (pt_inception-2015-12-05)?")
        if not isinstance(value, torch.Tensor) or value.shape != ours[key].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"{path}: key {key!r} is {got}, expected shape {tuple(ours[key].shape)}")
    for key in ours:
        if key not in state and not key.endswith("num_batches_tracked"):
            raise UserError(f"{path}: missing key {key!r}; not the FID Inception weights (pt_inception-2015-12-05)?")
    counters = {key: torch.zeros((), dtype=torch.long) for key in ours if key.endswith("num_batches_tracked")}
    model.load_state_dict({**counters, **{k: v.float() if v.is_floating_point() else v for k, v in state.items()}},
                          assign=True)  # assign: the file's tensors replace the meta ones
    return model.eval().requires_grad_(False)
