"""The planner's memory model: how many bytes training and prediction need, and the budget.

planner.py decides patch, batch, caching and the planes per inference call from these estimates
(nnU-Net keeps its VRAM estimate apart from the decisions that use it):

    default_memory_gb           the budget: 90% of the GPU, else a share of the RAM
    training_activation_bytes   what autograd saves for one training step, measured with
                                saved-tensor hooks (activations are linear in patch area and batch)
    training_memory_bytes       those activations scaled to a patch and batch, times a safety factor
                                for the optimizer state and the allocator's slack
    volume_cache_bytes          the training volumes cached as float32
    inference_memory_bytes      the peak of plane-wise prediction: the volumes in and out and a
                                chunk of planes' feature maps
"""

from __future__ import annotations

import os

import torch

TRAIN_MEMORY_SAFETY = 2.0  # measured autograd activations x this = the allowance (optimizer, allocator slack)
RAM_SHARE = 0.25  # default CPU memory budget: a quarter of the RAM
GPU_SHARE = 0.9  # default GPU memory budget: this share of the device's memory

# Peak memory of plane-wise inference (scripts/inferers.py). As for training, the budget is for the
# data: the process itself (torch, MONAI, the network) adds ~0.7 GB.
OUTPUT_BYTES_PER_VOXEL = 6  # the float32 synthesis, then its copy in the stored dtype (int16) when written
INPUT_BYTES_PER_VOXEL = 12  # the loaded volume, its HU copy (known slices) and the standardised float32


def default_memory_gb() -> tuple[float, str]:
    """The memory budget (GB) and why: GPU_SHARE of the GPU's memory, else RAM_SHARE of the RAM."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        return round(total * GPU_SHARE, 1), f"{GPU_SHARE:.0%} of the GPU's {total:.1f} GB"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return round(ram * RAM_SHARE, 1), f"{int(RAM_SHARE * 100)}% of this machine's {ram:.1f} GB RAM (no GPU)"


def training_activation_bytes(net, iteration, patch: list[int], batch: int, stage: int) -> int:
    """Bytes autograd saves for one training step (measured with saved-tensor hooks)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.layout == torch.strided and t.device.type != "meta":  # dense tensors own a storage
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    volume = torch.zeros(batch, 1, *patch)
    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = net(volume, objective=lambda n, v: iteration.losses(n, v, stage, iteration.gamma))
    del terms
    return sum(seen.values())


def training_memory_bytes(per_sample: float, ref_xy: int, xy: int, batch: int) -> float:
    """The allowance for training at an in-plane patch ``xy`` and ``batch``, from the activations
    ``per_sample`` measured at ``ref_xy``: linear in area and batch, times TRAIN_MEMORY_SAFETY."""
    return per_sample * (xy / ref_xy) ** 2 * batch * TRAIN_MEMORY_SAFETY


def volume_cache_bytes(shapes: list) -> float:
    """The training volumes (X, Y, Z each) cached as float32 after preprocessing."""
    return sum(4.0 * s[0] * s[1] * s[2] for s in shapes)


def plane_feature_maps(planar: dict, factor: int) -> int:
    """Width-channel maps of G_c/G_s alive at once per plane pixel: the head, each group's output
    and its copy in the layer attention's stack, the attention's output, the body (the ``han``
    upsampler adds r maps for its shuffled width*r channels)."""
    maps = 2 * int(planar.get("groups", 2)) + 4
    return maps + (2 * factor if planar.get("upsampler", "espcn") == "han" else 0)


def inference_memory_bytes(
    shape: list[int], factor: int, plane_chunk: int, planar: dict, axial: dict | None
) -> float:
    """Estimated peak memory (beyond the process's own) of predicting a volume ``shape`` (X, Y, Z)
    with ``plane_chunk`` whole planes per network call.

    The volume part: the output (float32 at (Z-1)*r+1 slices, then its stored-dtype copy) and
    the input's copies. The chunk part: ``plane_chunk`` planes of G_c/G_s feature maps
    (the largest plane, X or Y by Z) or of G_a's (two X x Y slices at quarter width on average).
    """
    x, y, z = (int(s) for s in shape)
    z_out = (z - 1) * factor + 1
    volume = OUTPUT_BYTES_PER_VOXEL * x * y * z_out + INPUT_BYTES_PER_VOXEL * x * y * z
    planes = 4.0 * max(x, y) * z * int(planar["width"]) * plane_feature_maps(planar, factor)
    if axial is not None:
        planes = max(planes, 4.0 * x * y * max(int(axial["width"]) // 2, 8) * 4)
    return volume + plane_chunk * planes
