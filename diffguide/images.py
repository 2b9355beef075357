"""Image grids for the CLI and the docs."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """One image (C, H, W) in [0, 1] as an 8-bit PIL image (``L`` or ``RGB``)."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def labelled_grid(
    images: torch.Tensor, row_labels: Sequence[str], zoom: int = 2, margin: int = 24
) -> PIL.Image.Image:
    """A PNG-ready grid: one row per label, ``images`` (rows*cols, C, H, W) in [0, 1], row-major.

    Each row starts with its label, written in a margin on the left.
    """
    rows = len(row_labels)
    if rows == 0 or images.shape[0] % rows:
        raise ValueError(f"{images.shape[0]} images do not fill {rows} rows")
    cols = images.shape[0] // rows
    _, channels, height, width = images.shape
    cell_h, cell_w = height * zoom, width * zoom
    mode = "L" if channels == 1 else "RGB"
    grid = PIL.Image.new(mode, (margin + cols * (cell_w + 2), rows * (cell_h + 2)), color=255)
    font = PIL.ImageFont.load_default()
    draw = PIL.ImageDraw.Draw(grid)
    for r, label in enumerate(row_labels):
        y = r * (cell_h + 2)
        draw.text((4, y + cell_h // 2 - 6), str(label), fill=0, font=font)
        for c in range(cols):
            tile_image = to_pil(images[r * cols + c])
            grid.paste(tile_image.resize((cell_w, cell_h), PIL.Image.NEAREST), (margin + c * (cell_w + 2), y))
    return grid
