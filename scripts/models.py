"""The denoising networks and the registry that rebuilds one from a checkpoint's metadata.

Every network maps a batch of noisy slices (N, 1, H, W), intensities on the [0, 1] scale, to denoised
slices of the same shape, for any H and W: inputs are reflect-padded to a multiple of the network's
stride and cropped back. Networks with `noise_map=True` also take the noise sigma of each slice
(N,), given to them as a constant extra input channel, as FFDNet does."""
import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes


def pad_to_multiple(x, multiple):
    """Reflect-pad (N, C, H, W) at the bottom and right so H and W are multiples of `multiple`."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    # reflect needs the pad to be smaller than the side; tiny images fall back to replicate
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def noise_map_channel(x, noise_sigma):
    """A (N, 1, H, W) channel holding each slice's noise sigma."""
    sigma = torch.as_tensor(noise_sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    return sigma.expand(x.shape[0], 1, *x.shape[-2:])


class SeedAutoencoder(nn.Module):
    """The original project's network (9,569 parameters), unchanged but for padding to even sizes."""
    stride = 2

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
        self.dec2 = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, noise_sigma=None):
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.stride)
        x1 = self.enc1(x)
        x5 = self.dec1(self.up(self.enc2(self.pool(x1))))
        return torch.sigmoid(self.dec2(x5 + x1))[..., :height, :width]


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017): a plain stack of 3x3 convolutions at full resolution that predicts
    the noise, which is subtracted from the input (residual learning)."""
    stride = 1

    def __init__(self, depth=8, width=32, noise_map=False, dilations=None):
        """dilations: one per layer, e.g. [1, 2, 3, 4, 4, 3, 2, 1]: spaced-out 3x3 kernels see a wider
        neighbourhood at the same cost (IRCNN, Zhang et al. 2017, "Learning deep CNN denoiser prior for image
        restoration"); None = all 1, plain DnCNN."""
        super().__init__()
        self.noise_map = noise_map
        dilations = list(dilations or [1] * depth)
        if len(dilations) != depth or not all(type(d) is int and d >= 1 for d in dilations):  # not True
            raise ValueError(f"dilations={dilations}: expected {depth} whole numbers of 1 or more, one per layer")
        in_channels = [1 + noise_map] + [width] * (depth - 1)
        out_channels = [width] * (depth - 1) + [1]
        layers = []
        for n_in, n_out, dilation in zip(in_channels, out_channels, dilations):
            layers += [nn.Conv2d(n_in, n_out, 3, padding=dilation, dilation=dilation), nn.ReLU()]
        self.body = nn.Sequential(*layers[:-1])  # no ReLU after the last layer: the noise is signed

    def forward(self, x, noise_sigma=None):
        inputs = torch.cat([x, noise_map_channel(x, noise_sigma)], 1) if self.noise_map else x
        return x - self.body(inputs)


def conv_block(in_channels, out_channels, n_convs=2):
    layers = []
    for i in range(n_convs):
        layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """A small residual U-Net that starts at half resolution (pixel_unshuffle), then goes down to 1/4
    and 1/8 with strided convolutions and back up with pixel shuffle, adding skip connections;
    it predicts the noise. Working below full resolution keeps it fast on a CPU."""
    stride = 8

    def __init__(self, width=32, noise_map=True):
        super().__init__()
        self.noise_map = noise_map
        self.enc1 = conv_block(4 + noise_map, width)
        self.down1 = nn.Conv2d(width, 2 * width, 2, stride=2)
        self.enc2 = conv_block(2 * width, 2 * width)
        self.down2 = nn.Conv2d(2 * width, 4 * width, 2, stride=2)
        self.middle = conv_block(4 * width, 4 * width, n_convs=3)
        self.up2 = nn.Sequential(nn.Conv2d(4 * width, 8 * width, 1), nn.PixelShuffle(2))
        self.dec2 = conv_block(2 * width, 2 * width)
        self.up1 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 1), nn.PixelShuffle(2))
        self.dec1 = conv_block(width, width)
        self.out = nn.Sequential(nn.Conv2d(width, 4, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x, noise_sigma=None):
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.stride)
        inputs = F.pixel_unshuffle(padded, 2)
        if self.noise_map:
            inputs = torch.cat([inputs, noise_map_channel(inputs, noise_sigma)], 1)
        x1 = self.enc1(inputs)
        x2 = self.enc2(self.down1(x1))
        x3 = self.middle(self.down2(x2))
        y2 = self.dec2(self.up2(x3) + x2)
        y1 = self.dec1(self.up1(y2) + x1)
        return (padded - self.out(y1))[..., :height, :width]


class ShuffleNet(nn.Module):
    """FFDNet-style network (Zhang et al. 2018): pixel_unshuffle the slice into `factor`**2 sub-images,
    run a stack of 3x3 convolutions at 1/factor resolution (where capacity is cheap), pixel_shuffle
    back and subtract the predicted noise from the input."""

    def __init__(self, depth=10, width=64, factor=2, noise_map=True):
        super().__init__()
        self.noise_map = noise_map
        self.stride = factor
        in_channels = factor * factor + noise_map
        layers = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(width, factor * factor, 3, padding=1), nn.PixelShuffle(factor)]
        self.body = nn.Sequential(*layers)

    def forward(self, x, noise_sigma=None):
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.stride)
        inputs = F.pixel_unshuffle(padded, self.stride)
        if self.noise_map:
            inputs = torch.cat([inputs, noise_map_channel(inputs, noise_sigma)], 1)
        return (padded - self.body(inputs))[..., :height, :width]


ARCHITECTURES = {"seed": SeedAutoencoder, "dncnn": DnCNN, "unet": UNet, "shufflenet": ShuffleNet}


def build_model(arch, arch_args=None):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**(arch_args or {}))


def uses_noise_map(model):
    return getattr(model, "noise_map", False)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def model_from_checkpoint(checkpoint):
    """Rebuild the network a checkpoint (a dict from torch.load(..., weights_only=True)) describes."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or not isinstance(checkpoint.get("metadata"), dict):
        raise ValueError("not a checkpoint of this repo (no state_dict and metadata)")
    metadata = checkpoint["metadata"]
    if metadata.get("format_version") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {metadata.get('format_version')}; this code reads format {CHECKPOINT_FORMAT}")
    model = build_model(metadata["arch"], metadata.get("arch_args"))
    model.load_state_dict(checkpoint["state_dict"])  # raises on a mismatch of architecture
    return model
