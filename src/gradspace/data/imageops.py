"""Batched image conversions shared by the array-backed sources.

All functions work on whole batches (uint8 N×H×W×C numpy arrays) with torch ops, so
preparing a dataset never loops over samples in Python.
"""

from __future__ import annotations

import numpy as np

# ITU-R BT.601 luma weights, the same as PIL's ``Image.convert("L")``:
# L = 0.299 R + 0.587 G + 0.114 B
LUMA = (0.299, 0.587, 0.114)


def to_nhwc(images: np.ndarray) -> np.ndarray:
    """Give a batch an explicit channel axis: N×H×W -> N×H×W×1; drop an alpha channel."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected N×H×W[×C] images, got shape {images.shape}")
    if images.shape[-1] == 4:
        images = images[..., :3]
    if images.shape[-1] == 2:  # gray + alpha
        images = images[..., :1]
    return images


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert uint8 N×H×W×C to ``channels`` (1 or 3).

    Grayscale -> RGB repeats the channel; RGB -> grayscale uses the BT.601 luminance
    L = 0.299 R + 0.587 G + 0.114 B, rounded to the nearest integer.
    """
    images = to_nhwc(images)
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:
        luma = images.astype(np.float32) @ np.asarray(LUMA, dtype=np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 N×H×W×C to N×size×size×C (bilinear, antialiased when shrinking).

    Non-square inputs are resized so the shorter side is ``size`` and then centre-cropped.
    """
    import torch
    import torch.nn.functional as F

    images = to_nhwc(images)
    n, h, w, c = images.shape
    if h == size and w == size:
        return images
    if n == 0:
        return np.zeros((0, size, size, c), dtype=np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    t = t[:, :, top:top + size, left:left + size]
    out = t.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return out.numpy()


def crop_resize(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crop square boxes out of one H×W×C uint8 image and resize them to size×size.

    ``boxes`` is K×3 (top, left, side) in pixels. Uses ``torchvision.ops.roi_align``
    (aligned=True, adaptive sampling), i.e. bilinear sampling averaged over
    ceil(side/size)² points per output pixel, which antialiases large crops. All K
    crops of the image are done in one call.
    """
    import torch
    from torchvision.ops import roi_align

    image = to_nhwc(image[None])[0]
    if len(boxes) == 0:
        return np.zeros((0, size, size, image.shape[-1]), dtype=np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    b = torch.as_tensor(np.asarray(boxes), dtype=torch.float32)
    top, left, side = b[:, 0], b[:, 1], b[:, 2]
    rois = torch.stack([torch.zeros_like(top), left, top, left + side, top + side], dim=1)
    out = roi_align(t, rois, output_size=(size, size), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)
    return out.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
