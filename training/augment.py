"""EDM v1 non-leaking data augmentation (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Appendix F.2; the transformations of Karras et al. 2020, "Training
Generative Adversarial Networks with Limited Data", Appendix B).

`AugmentPipe(images)` transforms a batch of images in [-1, 1] and returns `(images, labels)`, where
`labels` ([N, augment_dim] float32) describe the transformation applied to each image. The network is
conditioned on these labels during training and receives none at sampling time, so augmentations
do not leak into the generated images. With the EDM training options (xflip=1e8, yflip=1, scale=1,
rotate_frac=1, aniso=1, translate_frac=1) there are 9 label dimensions.

Stages, each enabled by a non-zero probability multiplier (applied with probability multiplier * p):
  pixel blitting  xflip, yflip, rotate_int (multiples of 90 degrees), translate_int (integer shifts
                  with mirrored borders)
  geometric       scale, rotate_frac, aniso, translate_frac: one affine map per image, applied by
                  2x upsampling with the Symlet-6 wavelet filter, bilinear resampling, and
                  filtered 2x downsampling (reflection-padded so no border pixels are invented)
  color           brightness, contrast, lumaflip, hue, saturation: one 4x4 color matrix per image

Class name and constructor arguments are those of the module `training/augment.py` that EDM v1
pickles store; this file is embedded in them, so it imports only numpy, torch and the official
torch_utils modules.
"""

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence

# Low-pass decomposition filter of the Symlet wavelet with 6 vanishing moments (least asymmetric
# Daubechies wavelet): sum = sqrt(2), unit energy, orthogonal to its even shifts.
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]

#----------------------------------------------------------------------------
# Homogeneous transformation matrices: 3x3 for 2-D image coordinates, 4x4 for RGB colors.
# Entries may be Python numbers or per-image tensors [N]; the result is [3,3] / [4,4] or [N,3,3] / [N,4,4].


def matrix(*rows, device=None):
    entries = [x for row in rows for x in row]
    tensors = [x for x in entries if isinstance(x, torch.Tensor)]
    if not tensors:
        return misc.constant(np.asarray(rows), device=device)
    ref = tensors[0]
    entries = [x if isinstance(x, torch.Tensor) else misc.constant(x, shape=ref.shape, device=ref.device) for x in entries]
    return torch.stack(entries, dim=-1).reshape(ref.shape + (len(rows), -1))


def translate2d(tx, ty, **kwargs):
    return matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kwargs)


def scale2d(sx, sy, **kwargs):
    return matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kwargs)


def rotate2d(theta, **kwargs):
    return matrix([torch.cos(theta), torch.sin(-theta), 0], [torch.sin(theta), torch.cos(theta), 0], [0, 0, 1], **kwargs)


def translate2d_inv(tx, ty, **kwargs):
    return translate2d(-tx, -ty, **kwargs)


def scale2d_inv(sx, sy, **kwargs):
    return scale2d(1 / sx, 1 / sy, **kwargs)


def rotate2d_inv(theta, **kwargs):
    return rotate2d(-theta, **kwargs)


def translate3d(tx, ty, tz, **kwargs):
    return matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], **kwargs)


def scale3d(sx, sy, sz, **kwargs):
    return matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], **kwargs)


def rotate3d(v, theta, **kwargs):
    """Rotation by `theta` about the unit axis `v` (Rodrigues' formula)."""
    vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return matrix(
        [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
        [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
        [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
        [0, 0, 0, 1], **kwargs)


def _gate(value, prob, shape, device):
    """`value` where a uniform draw of `shape` falls below `prob`, else 0 (one draw per image)."""
    return torch.where(torch.rand(shape, device=device) < prob, value, torch.zeros_like(value))

#----------------------------------------------------------------------------


@persistence.persistent_class
class AugmentPipe:
    """Each transformation X is applied to an image with probability X * p (clipped to [0, 1] by the
    comparison with a uniform draw), so `p` scales them all. Strengths:

      translate_int_max    largest integer shift, as a fraction of the image size
      scale_std            std of log2 of the isotropic scale factor
      rotate_frac_max      largest rotation, as a fraction of a full turn
      aniso_std            std of log2 of the anisotropic scale factor
      aniso_rotate_prob    probability that the anisotropic scaling uses a randomly rotated frame
      translate_frac_std   std of the fractional shift, as a fraction of the image size
      brightness_std       std of the brightness offset
      contrast_std         std of log2 of the contrast factor
      hue_max              largest hue rotation, as a fraction of a full turn
      saturation_std       std of log2 of the saturation factor
    """

    def __init__(self, p=1,
                 xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
                 scale=0, rotate_frac=0, aniso=0, translate_frac=0,
                 scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125,
                 brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0,
                 brightness_std=0.2, contrast_std=0.5, hue_max=1, saturation_std=1):
        super().__init__()
        self.p = float(p)
        # Pixel blitting: probability multipliers, then the shift range.
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.rotate_int = float(rotate_int)
        self.translate_int = float(translate_int)
        self.translate_int_max = float(translate_int_max)
        # Geometric transformations: probability multipliers, then strengths.
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)
        # Color transformations: probability multipliers, then strengths.
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.lumaflip = float(lumaflip)
        self.hue = float(hue)
        self.saturation = float(saturation)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)
        self.hue_max = float(hue_max)
        self.saturation_std = float(saturation_std)

    def __call__(self, images):
        N, C, H, W = images.shape
        labels = [torch.zeros([N, 0], device=images.device)]
        images = self._pixel_blitting(images, labels)
        G_inv = self._geometric_params(images, labels)
        if G_inv is not None:
            images = self._apply_geometric(images, G_inv)
        M = self._color_params(images, labels)
        if M is not None:
            images = self._apply_color(images, M)
        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

    def _pixel_blitting(self, images, labels):
        N, C, H, W = images.shape
        device = images.device
        if self.xflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1, 1], device=device), self.xflip * self.p, [N, 1, 1, 1], device)
            images = torch.where(w == 1, images.flip(3), images)
            labels += [w]
        if self.yflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1, 1], device=device), self.yflip * self.p, [N, 1, 1, 1], device)
            images = torch.where(w == 1, images.flip(2), images)
            labels += [w]
        if self.rotate_int > 0:   # w quarter turns: x-flip, y-flip and transpose compose the rotations
            w = _gate(torch.randint(4, [N, 1, 1, 1], device=device), self.rotate_int * self.p, [N, 1, 1, 1], device)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1
            w = _gate(w, self.translate_int * self.p, [1, N, 1, 1, 1], device)
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            images = _shift_mirrored(images, tx, ty)
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]
        return images

    def _geometric_params(self, images, labels):
        """Inverse affine map per image ([N,3,3], output pixel -> input pixel, origin at the image
        centre), or None when no geometric augmentation is enabled."""
        N, C, H, W = images.shape
        device = images.device
        G_inv = None
        compose = lambda G, A: A if G is None else G @ A   # G_inv = G_inv @ A, starting from the identity
        if self.scale > 0:
            w = _gate(torch.randn([N], device=device), self.scale * self.p, [N], device)
            s = w.mul(self.scale_std).exp2()
            G_inv = compose(G_inv, scale2d_inv(s, s))
            labels += [w]
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = _gate(w, self.rotate_frac * self.p, [N], device)
            G_inv = compose(G_inv, rotate2d_inv(-w))
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = _gate(w, self.aniso * self.p, [N], device)
            r = _gate(r, self.aniso_rotate_prob, [N], device)
            s = w.mul(self.aniso_std).exp2()
            G_inv = compose(G_inv, rotate2d_inv(r)) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = _gate(torch.randn([2, N], device=device), self.translate_frac * self.p, [1, N], device)
            G_inv = compose(G_inv, translate2d_inv(w[0].mul(W * self.translate_frac_std),
                                                   w[1].mul(H * self.translate_frac_std)))
            labels += [w[0], w[1]]
        return G_inv

    def _apply_geometric(self, images, G_inv):
        N, C, H, W = images.shape
        device = images.device
        Hz = np.asarray(SYM6, dtype=np.float32)
        Hz_pad = len(Hz) // 4

        # Reflection-pad enough that every output pixel (plus the filter support) maps inside.
        cx, cy = (W - 1) / 2, (H - 1) / 2
        corners = matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device)   # [4, xyz]
        corners = G_inv @ corners.t()                                                               # [N, xyz, 4]
        extent = corners[:, :2, :].permute(1, 0, 2).flatten(1)                                     # [xy, N*4]
        margin = torch.cat([-extent, extent]).max(dim=1).values                                     # [x0, y0, x1, y1]
        margin = margin + misc.constant([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, device=device)
        margin = margin.max(misc.constant([0, 0] * 2, device=device))
        margin = margin.min(misc.constant([W - 1, H - 1] * 2, device=device))
        mx0, my0, mx1, my1 = margin.ceil().to(torch.int32)
        images = torch.nn.functional.pad(input=images, pad=[mx0, mx1, my0, my1], mode='reflect')
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2) @ G_inv

        # 2x upsampling: zero stuffing, then the wavelet filter along x and along y.
        images = _upsample_2x(images, Hz)
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d_inv(2, 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d_inv(-0.5, -0.5, device=device)

        # Bilinear resampling in normalised [-1, 1] coordinates.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        G_inv = (scale2d(2 / images.shape[3], 2 / images.shape[2], device=device) @ G_inv
                 @ scale2d_inv(2 / shape[3], 2 / shape[2], device=device))
        grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

        # 2x downsampling with the wavelet filter, then crop the filter margin.
        return _downsample_2x(images, Hz, Hz_pad)

    def _color_params(self, images, labels):
        """Color matrix per image ([N,4,4], acting on [r, g, b, 1]), or None when no color augmentation is enabled."""
        N = images.shape[0]
        device = images.device
        I_4 = torch.eye(4, device=device)
        M = None
        apply = lambda A, M: A if M is None else A @ M     # M = A @ M, starting from the identity
        luma_axis = misc.constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), device=device)
        if self.brightness > 0:
            w = _gate(torch.randn([N], device=device), self.brightness * self.p, [N], device)
            b = w * self.brightness_std
            M = apply(translate3d(b, b, b), M)
            labels += [w]
        if self.contrast > 0:
            w = _gate(torch.randn([N], device=device), self.contrast * self.p, [N], device)
            c = w.mul(self.contrast_std).exp2()
            M = apply(scale3d(c, c, c), M)
            labels += [w]
        if self.lumaflip > 0:   # mirror the colors through the plane orthogonal to the luma axis
            w = _gate(torch.randint(2, [N, 1, 1], device=device), self.lumaflip * self.p, [N, 1, 1], device)
            M = apply(I_4 - 2 * luma_axis.ger(luma_axis) * w, M)
            labels += [w]
        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = _gate(w, self.hue * self.p, [N], device)
            M = apply(rotate3d(luma_axis, w), M)
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = _gate(torch.randn([N, 1, 1], device=device), self.saturation * self.p, [N, 1, 1], device)
            luma = luma_axis.ger(luma_axis)
            M = apply(luma + (I_4 - luma) * w.mul(self.saturation_std).exp2(), M)
            labels += [w]
        return M

    def _apply_color(self, images, M):
        N, C, H, W = images.shape
        images = images.reshape([N, C, H * W])
        if C == 3:
            images = M[:, :3, :3] @ images + M[:, :3, 3:]
        elif C == 1:   # luma images: average the RGB rows of the matrix
            M = M[:, :3, :].mean(dim=1, keepdims=True)
            images = images * M[:, :, :3].sum(dim=2, keepdims=True) + M[:, :, 3:]
        else:
            raise ValueError('Image must be RGB (3 channels) or L (1 channel)')
        return images.reshape([N, C, H, W])


def _shift_mirrored(images, tx, ty):
    """Shift each image by (tx, ty) whole pixels ([N,1,1,1] each), mirroring at the borders."""
    N, C, H, W = images.shape
    b, c, y, x = torch.meshgrid(*(torch.arange(n, device=images.device) for n in images.shape), indexing='ij')
    x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()
    y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
    return images.flatten()[(((b * C) + c) * H + y) * W + x]


def _upsample_2x(images, Hz):
    N, C = images.shape[:2]
    kernel = misc.constant(Hz[None, None, ::-1], dtype=images.dtype, device=images.device).tile([C, 1, 1])
    pad = (len(Hz) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
    images = torch.nn.functional.conv2d(images, kernel.unsqueeze(2), groups=C, padding=[0, pad])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
    return torch.nn.functional.conv2d(images, kernel.unsqueeze(3), groups=C, padding=[pad, 0])


def _downsample_2x(images, Hz, crop):
    C = images.shape[1]
    kernel = misc.constant(Hz[None, None, :], dtype=images.dtype, device=images.device).tile([C, 1, 1])
    pad = (len(Hz) - 1) // 2
    images = torch.nn.functional.conv2d(images, kernel.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])
    images = images[:, :, :, crop:-crop]
    images = torch.nn.functional.conv2d(images, kernel.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])
    return images[:, :, crop:-crop, :]
