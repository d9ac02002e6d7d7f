"""load_image: RGB uint8 (3, H, W), upright by the EXIF orientation tag; errors name the file."""

import numpy as np
import pytest
import torch
from PIL import Image

from solo_fast.data import load_image

# H/W=image height/width as stored in the file

H, W = 5, 7
EXIF_ORIENTATION = 0x0112


def _pixels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)  # (H, W, 3)


def _save(path, pixels, orientation=None, mode="RGB"):
    image = Image.fromarray(pixels).convert(mode)
    if orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        image.save(path, exif=exif)
    return path


# What a viewer shows for each EXIF orientation, written with numpy (TIFF 6.0 / EXIF 2.3 tag 274)
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise to view
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise to view
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path, orientation):
    pixels = _pixels()
    path = _save(tmp_path / f"o{orientation}.png", pixels, orientation)
    image = load_image(path)
    expected = torch.from_numpy(np.ascontiguousarray(UPRIGHT[orientation](pixels)))
    assert image.dtype == torch.uint8 and image.is_contiguous()
    assert torch.equal(image, expected.permute(2, 0, 1))  # (3, H', W')


def test_untagged_png_and_string_path(tmp_path):
    pixels = _pixels()
    path = _save(tmp_path / "plain.png", pixels)
    assert torch.equal(load_image(str(path)), torch.from_numpy(pixels).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(tmp_path, mode):
    pixels = _pixels()
    path = _save(tmp_path / f"{mode}.png", pixels, mode=mode)
    expected = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
    image = load_image(path)
    assert image.shape == (3, H, W)
    assert torch.equal(image, torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file .*nope\.jpg not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path)  # a folder is not an image file


def test_undecodable_file_is_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png"):
        load_image(broken)
