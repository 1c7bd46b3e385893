"""Image features pinned by value (issue 29, item 2): colour order and scale, (height, width) and the
cells' boxes, the cells' order, the network's output, JPEG draft decoding and 16-bit images; then what
--extract says when its input or its --out folder goes wrong. Each test here failed on a bug in
plumbing/grid_features.py that passed every test before.
Run from the repository root: python -m pytest -q plumbing/test_grid_features.py"""
import errno
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data import DataError
from plumbing import features, grid_features

Image = pytest.importorskip("PIL.Image")  # Pillow comes with matplotlib

# ImageNet's mean and std written out here, not read from grid_features, so that a changed constant shows
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Cheap(nn.Module):
    """Stands in for the ResNet-101 where what is pinned is not the network: an image's mean in 2048 channels."""

    def forward(self, batch):
        return nn.functional.avg_pool2d(batch, 32).mean(1, keepdim=True).expand(-1, 2048, -1, -1)


def extract_argv(tmp_path, monkeypatch, out):
    """Two 32 x 32 images in tmp_path/images/P1, Cheap in place of the weight file: --extract's argv."""
    (tmp_path / "images" / "P1").mkdir(parents=True, exist_ok=True)
    for k in range(2):
        Image.new("RGB", (32, 32), (100 * k, 100, 200)).save(tmp_path / "images" / "P1" / f"{k}.png")
    (tmp_path / "w.pth").write_bytes(b"not read")
    monkeypatch.setattr(grid_features, "load_weights", lambda path: Cheap())
    return ["--extract", str(tmp_path / "images"), "--weights", str(tmp_path / "w.pth"), "--out", str(out),
            "--image-size", "32"]


def error_line(capsys):
    """The last line on stderr, which must be the error."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def normalise(rgb_uint8):
    """(H, W, 3) uint8 RGB -> (3, H, W) as the network expects: /255, minus mean, over std, RGB order."""
    pixels = torch.from_numpy(np.asarray(rgb_uint8, np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_solid_colour_is_normalised_channel_by_channel_in_rgb_order(tmp_path):
    """A PNG of one colour whose R, G and B all differ: each channel is (value/255 - mean) / std with
    the mean and std of that channel. Catches BGR pixels, mean/std in BGR order, pixels not divided by 255."""
    path = tmp_path / "orange.png"
    Image.new("RGB", (40, 24), (255, 128, 0)).save(path)
    pixels, (height, width) = grid_features.load_image(path, size=32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    expected = torch.tensor([(255 / 255 - 0.485) / 0.229,  # R: 2.2489
                             (128 / 255 - 0.456) / 0.224,  # G: 0.2052
                             (0 / 255 - 0.406) / 0.225])  # B: -1.8044
    torch.testing.assert_close(pixels.mean((1, 2)), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pixels, expected.view(3, 1, 1).expand(3, 32, 32), rtol=0, atol=1e-5)


def test_non_square_image_keeps_height_width_and_cell_boxes(tmp_path, monkeypatch):
    """A 64 x 32 image (64 wide, 32 high): image_h 32, image_w 64, and cell (row 0, column 1) is the box
    x 12.8 .. 25.6, y 0 .. 6.4, from load_image through to the .npz that --extract writes."""
    picture = np.zeros((32, 64, 3), np.uint8)
    picture[:, :32] = (255, 0, 0)  # left half red, right half blue
    picture[:, 32:] = (0, 0, 255)
    images = tmp_path / "images"
    (images / "P1").mkdir(parents=True)
    Image.fromarray(picture).save(images / "P1" / "0.png")
    assert Image.open(images / "P1" / "0.png").size == (64, 32)  # PIL's (width, height)

    pixels, size = grid_features.load_image(images / "P1" / "0.png", size=32)
    assert size == (32, 64)  # (height, width)
    red, blue = normalise(np.array([[[255, 0, 0]]], np.uint8))[:, 0, 0], normalise(np.array([[[0, 0, 255]]], np.uint8))[:, 0, 0]
    torch.testing.assert_close(pixels[:, :, 0], red.view(3, 1).expand(3, 32))  # the whole image, squeezed, not turned
    torch.testing.assert_close(pixels[:, :, -1], blue.view(3, 1).expand(3, 32))

    boxes = grid_features.cell_boxes(32, 64)
    assert boxes.shape == (25, 4)
    np.testing.assert_allclose(boxes[1], [12.8, 0.0, 25.6, 6.4], rtol=1e-6)  # row 0, column 1
    np.testing.assert_allclose(boxes[5], [0.0, 6.4, 12.8, 12.8], rtol=1e-6)  # row 1, column 0
    np.testing.assert_allclose(boxes[24], [51.2, 25.6, 64.0, 32.0], rtol=1e-6)

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read")
    monkeypatch.setattr(grid_features, "load_weights", lambda path: Cheap())
    assert grid_features.extract(images, weights, tmp_path / "f", size=32, batch_size=1) == []
    with np.load(tmp_path / "f" / "P1" / "0.npz") as npz:
        assert (int(npz["image_h"]), int(npz["image_w"])) == (32, 64)
        np.testing.assert_allclose(npz["bbox"][1], [12.8, 0.0, 25.6, 6.4], rtol=1e-6)
        assert npz["x"].shape == (25, 2048)


def test_grid_regions_go_row_by_row_as_cell_boxes_do():
    """A 10 x 10 map whose value is 100 * row + column (channel 0) and row, column (channels 1, 2): cell
    k = 5 * r + c averages rows 2r, 2r+1 and columns 2c, 2c+1, and its centre is cell_boxes' box k's centre.
    Catches cells in column order (cells 0, 6, 12, 18, 24 are the same in both orders; the others are not)."""
    rows, columns = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    feature_map = torch.stack([100 * rows + columns, rows, columns]).unsqueeze(0)  # (1, 3, 10, 10)
    regions = grid_features.grid_regions(feature_map)
    assert regions.shape == (1, 25, 3)
    r, c = np.divmod(np.arange(25), 5)
    torch.testing.assert_close(regions[0, :, 0], torch.tensor(100 * (2 * r + 0.5) + (2 * c + 0.5), dtype=torch.float32))
    assert regions[0, 1, 0].item() == 100 * 0.5 + 2.5  # cell (row 0, column 1): rows 0-1, columns 2-3
    assert regions[0, 5, 0].item() == 100 * 2.5 + 0.5  # cell (row 1, column 0): rows 2-3, columns 0-1
    # the centre of each region in the map, as a fraction of the image, is the centre of its box
    boxes = grid_features.cell_boxes(10, 20)  # any image size: boxes in its pixels
    centre_y, centre_x = (regions[0, :, 1].numpy() + 0.5) / 10, (regions[0, :, 2].numpy() + 0.5) / 10
    np.testing.assert_allclose(centre_x, (boxes[:, 0] + boxes[:, 2]) / 2 / 20, rtol=1e-6)
    np.testing.assert_allclose(centre_y, (boxes[:, 1] + boxes[:, 3]) / 2 / 10, rtol=1e-6)


def seeded_resnet101():
    """The ResNet-101 with weights drawn from a torch.Generator seeded 0, key by key in sorted order
    (independent of torch's default initialisation): convolutions He-normal, BatchNorm scale 0.5 .. 1,
    shift and running mean N(0, 0.1), running variance 0.5 .. 1.5; eval mode."""
    net = grid_features.ResNet101()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        state = net.state_dict()
        for name in sorted(state):
            tensor = state[name]
            if not tensor.is_floating_point():
                continue  # num_batches_tracked
            if tensor.dim() == 4:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2 / tensor[0].numel()))
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(".weight") and tensor.dim() == 1:
                tensor.copy_(0.5 + 0.5 * torch.rand(tensor.shape, generator=generator))
            else:  # BatchNorm bias and running_mean; fc (not used by forward)
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return net.eval(), generator


def test_seeded_network_gives_literal_output():
    """The network's layer4 map on a 64 x 96 input, against numbers written here. The README says this
    network gives torchvision's resnet101 output exactly; these literals keep today's output (checked
    against torchvision then) from changing unseen. Catches a missing ReLU after the residual sum (the map
    would have negative values), and any change of strides, padding, BatchNorm or block order.
    How the literals were obtained: this test's code, run once on the unchanged grid_features.py (torch
    2.13 CPU), printing out[0, 6:12, 0, 0], out[0, 2047, 1, 2], out.sum() ('%.6g') and the count of zeros."""
    net, generator = seeded_resnet101()
    images = torch.randn((1, 3, 64, 96), generator=generator)
    with torch.no_grad():
        out = net(images)
    assert out.shape == (1, 2048, 2, 3)  # stride 32
    assert out.min().item() == 0.0  # ReLU after the residual sum: nothing negative
    torch.testing.assert_close(out[0, 6:12, 0, 0], torch.tensor(LITERAL_SEVEN_TO_TWELVE), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[0, 2047, 1, 2].item(), LITERAL_LAST, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double().sum().item(), LITERAL_SUM, rtol=1e-4, atol=0)
    assert abs((out == 0).sum().item() - LITERAL_ZEROS) <= 2  # ReLU's zeros


LITERAL_SEVEN_TO_TWELVE = [15.6294, 0.942542, 37.5641, 16.2661, 101.534, 41.7822]  # out[0, 6:12, 0, 0]
LITERAL_LAST = 35.2198  # out[0, 2047, 1, 2]
LITERAL_SUM = 630370.0  # out.sum() of 12288 values
LITERAL_ZEROS = 3308  # of 12288 (the smallest positive value is 0.028: rounding cannot make it 0)


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory):
    """A 1600 x 1200 JPEG with detail at every scale: smooth random colour plus a fine product of sines
    (periods 9 and 11 pixels), which a decode at a quarter of the size loses."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).resize((1600, 1200), Image.Resampling.BICUBIC)
    y, x = np.mgrid[0:1200, 0:1600]
    fine = 60 * np.sin(2 * np.pi * x / 9) * np.sin(2 * np.pi * y / 11)
    picture = np.clip(0.7 * np.asarray(smooth, np.float32) + fine[..., None] + 40, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("jpeg") / "large.jpg"
    Image.fromarray(picture).save(path, quality=95)
    return path


def test_large_jpeg_draft_decodes_at_no_less_than_the_target_size(large_jpeg, monkeypatch):
    """What load_image promises of JPEG draft mode: Pillow may decode a large JPEG at a reduced scale
    (1600 x 1200 -> 800 x 600 for 448), but never below the target size, so the image is only ever
    shrunk, never upsampled. Pinned by the size the resize receives."""
    resized_from = []
    resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        resized_from.append(self.size)
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    pixels, size = grid_features.load_image(large_jpeg, size=448)
    assert size == (1200, 1600) and pixels.shape == (3, 448, 448)
    assert len(resized_from) == 1 and min(resized_from[0]) >= 448, resized_from  # 800 x 600 with Pillow 13


def test_large_jpeg_with_and_without_draft_decoding(large_jpeg):
    """load_image (draft decoding) against a full decode resized the same way: mean difference 0.035 in
    normalised units with Pillow 13 (draft at half the size); a decode at a quarter of the size, then
    upsampled, differs by 0.14. The bound 0.07 lies between."""
    pixels, _ = grid_features.load_image(large_jpeg, size=448)
    with Image.open(large_jpeg) as image:  # no draft: every pixel decoded
        full = normalise(image.convert("RGB").resize((448, 448), Image.Resampling.BILINEAR))
    difference = (pixels - full).abs()
    assert difference.mean().item() < 0.07, difference.mean().item()


def test_an_empty_weights_or_region_file_is_one_line_naming_it(tmp_path):
    """A 0-byte file makes torch.load raise with an empty message: the loaders' own error handlers must still
    say one line (they took the message's first line, and an empty message has none: IndexError)."""
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(DataError, match=r"w\.pth: not a plain state dict of tensors \(EOFError: 0 bytes\)"):
        grid_features.load_weights(tmp_path / "w.pth")
    (tmp_path / "item").mkdir()
    (tmp_path / "item" / "0.pth").write_bytes(b"")
    with pytest.raises(DataError, match=r"0\.pth: cannot be read as a list of \{'x': array\} \(EOFError: 0 bytes\);"):
        features.read_regions(tmp_path / "item")


def test_extract_that_makes_nothing_is_an_error_that_says_why(tmp_path, monkeypatch, capsys):
    """--extract where every image fails exits 2 with what to do (issue 28, item 4): weights whose features
    overflow float16 (random stand-in weights do), or files that are no images; a resumed run whose folder
    already holds features is still a success."""
    images = tmp_path / "images"
    (images / "P1").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(images / "P1" / "0.png")
    Image.fromarray(np.full((32, 32, 3), 50, np.uint8)).save(images / "P1" / "1.png")

    class Overflowing(nn.Module):  # weights that are not ImageNet's: features beyond float16
        def forward(self, batch):
            return torch.full((batch.shape[0], 2048, 1, 1), 1e6)

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read")
    monkeypatch.setattr(grid_features, "load_weights", lambda path: Overflowing())
    argv = ["--extract", str(images), "--weights", str(weights), "--out", str(tmp_path / "f"), "--image-size", "32"]
    assert features.main(argv) == 2
    assert "none of the 2 images was extracted" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"; 2 gave features that overflow float16, so --weights .*w\.pth is not the "
                                        r"ImageNet resnet101 .*downloaded by you\.$"):
        grid_features.extract(images, weights, tmp_path / "f", size=32)

    (images / "P2").mkdir()
    (images / "P2" / "0.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"none of the 3 images was extracted .*; 2 gave features that overflow "
                                        r"float16.*; 1 could not be read as images: fetch them again"):
        grid_features.extract(images, weights, tmp_path / "g", size=32)
    # a resumed folder that holds features already: the run that adds nothing is no failure
    (tmp_path / "g" / "P9").mkdir()
    np.savez(tmp_path / "g" / "P9" / "0.npz", x=np.ones((25, 2048), np.float16))
    assert len(grid_features.extract(images, weights, tmp_path / "g", size=32)) == 3


def test_high_bit_depth_grayscale_is_scaled_not_clipped_to_white(tmp_path):
    """A 16-bit grayscale PNG (Pillow's mode I;16) and a 32-bit TIFF of 16-bit values (mode I, as Pillow reads
    16-bit PGM) give the pixels of the same gradient saved in 8 bits. convert("RGB") alone clipped every
    value above 255 to white: 97% of this gradient."""
    gradient = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    Image.fromarray(gradient).save(tmp_path / "8.png")
    Image.fromarray(gradient.astype(np.uint16) * 257).save(tmp_path / "16.png")  # 0 .. 65535, 255 * 257 = 65535
    Image.fromarray(gradient.astype(np.int32) * 257).save(tmp_path / "32.tif")
    assert [Image.open(tmp_path / name).mode for name in ("16.png", "32.tif")] == ["I;16", "I"]
    expected, _ = grid_features.load_image(tmp_path / "8.png", size=32)
    white = normalise(np.full((1, 1, 3), 255, np.uint8))[:, 0, 0]
    for name in ("16.png", "32.tif"):
        pixels, _ = grid_features.load_image(tmp_path / name, size=32)
        assert (pixels[0] > white[0] - 0.01).float().mean() < 0.05, name  # not saturated
        torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)


def test_transparent_colour_of_a_grayscale_or_rgb_png_becomes_white(tmp_path):
    """A PNG without alpha may name one colour transparent (its tRNS chunk): those pixels are white, as
    load_image promises for transparent parts, in 8-bit RGB and 16-bit grayscale alike (the value 0 here)."""
    picture = np.full((32, 32), 100, np.uint8)
    picture[:, :16] = 0  # left half: the transparent colour
    Image.fromarray(np.stack([picture] * 3, -1)).save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / "16.png", transparency=0)
    white, grey = (normalise(np.full((1, 1, 3), v, np.uint8))[:, 0, 0].view(3, 1, 1) for v in (255, 100))
    for name in ("rgb.png", "16.png"):
        pixels, _ = grid_features.load_image(tmp_path / name, size=32)
        torch.testing.assert_close(pixels[:, :, :16], white.expand(3, 32, 16), rtol=0, atol=1e-5)
        torch.testing.assert_close(pixels[:, :, 16:], grey.expand(3, 32, 16), rtol=0, atol=1e-5)


def test_pixels_without_a_known_white_level_are_refused_by_name(tmp_path):
    """Floating-point pixels (mode F: 0 .. 1 became black), 32-bit values beyond 16 bits (clipped to white) and
    32-bit values within 8 bits (read as 16-bit: all but black) are refused, each naming the file and how to save it."""
    gradient = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    Image.fromarray(gradient).save(tmp_path / "float.tif")
    Image.fromarray((gradient * 2 ** 30).astype(np.int32)).save(tmp_path / "int32.tif")
    Image.fromarray((gradient * 255).astype(np.int32)).save(tmp_path / "int8.tif")  # read as 16-bit: all but black
    for name, what in (("float.tif", r"floating-point pixels \(Pillow mode F\)"),
                       ("int32.tif", r"32-bit pixel values \(0 to 1073741824\) beyond 16 bits"),
                       ("int8.tif", r"32-bit pixel values \(0 to 255\) that fit 8 bits, so its white level \(255 or "
                                    r"65535\) is not known")):
        with pytest.raises(DataError, match=rf"{name}: {what}.*; save it as an 8- or 16-bit PNG or as a JPEG$"):
            grid_features.load_image(tmp_path / name, size=32)


@pytest.mark.parametrize("content, damage", [
    (b'{"extractor": "grid', "JSONDecodeError: Unterminated string"),  # cut short
    (b"", "JSONDecodeError: Expecting value"),
    (b"[1, 2]", "a JSON list"),
    (b'{"extractor": "grid features, ResNet-101 layer4"}',
     r"without \['grid', 'image_size', 'weights', 'weights_bytes'\]"),
])
def test_a_damaged_extract_json_is_one_line_naming_it(tmp_path, monkeypatch, capsys, content, damage):
    """A folder being resumed whose extract.json is cut short, empty, of another type or without the settings:
    exit 2, one line naming the file and the fix (a JSONDecodeError, or "made with other settings" for what
    was never a record of settings), and nothing written."""
    out = tmp_path / "f"
    out.mkdir()
    (out / "extract.json").write_bytes(content)
    assert features.main(extract_argv(tmp_path, monkeypatch, out)) == 2
    assert re.fullmatch(rf"error: {re.escape(str(out))}/extract\.json: damaged, or not written by --extract \({damage}"
                        rf".*\); if the features in .* delete it and run the same command again, else extract into a "
                        rf"new folder\.", error_line(capsys))
    assert [p.name for p in out.iterdir()] == ["extract.json"]


def test_out_that_is_a_file_or_under_one_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """--out that is a file, or a path through a file: exit 2 and the fix (FileExistsError or NotADirectoryError)."""
    (tmp_path / "file").write_text("x")
    assert features.main(extract_argv(tmp_path, monkeypatch, tmp_path / "file")) == 2
    assert error_line(capsys) == (f"error: --out {tmp_path / 'file'}: a file, not a folder; pass a folder (it is made "
                                  f"when missing).")
    assert features.main(extract_argv(tmp_path, monkeypatch, tmp_path / "file" / "f")) == 2
    assert error_line(capsys) == (f"error: {tmp_path / 'file' / 'f' / 'extract.json'}: cannot be written (Not a "
                                  f"directory): a file stands where a folder must be: pass another --out.")


def test_out_that_is_read_only_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A read-only --out: exit 2, one line naming the file and the fix (a PermissionError traceback). Root
    writes into a read-only folder anyway: there, every write under it is refused as the folder would."""
    out = tmp_path / "f"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):
        real_open = open

        def read_only(file, mode="r", *args, **kwargs):
            if set(mode) & set("wax+") and Path(file).is_relative_to(out):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, mode, *args, **kwargs)
        monkeypatch.setattr("builtins.open", read_only)
    try:
        assert features.main(extract_argv(tmp_path, monkeypatch, out)) == 2
    finally:
        out.chmod(0o755)
    assert error_line(capsys) == (f"error: {out / 'extract.json'}: cannot be written (Permission denied): make {out} "
                                  f"writable, or pass another --out.")


def test_a_full_disk_stops_extract_in_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    """The disk fills while the second image is written: exit 2, one line naming that file and the fix (an
    OSError traceback), no half-written file left, the first image kept; the same command then goes on."""
    argv = extract_argv(tmp_path, monkeypatch, tmp_path / "f")
    savez, writes = np.savez, []

    def fills_the_disk(file, **arrays):
        writes.append(file)
        if len(writes) == 2:
            file.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        savez(file, **arrays)
    monkeypatch.setattr(np, "savez", fills_the_disk)
    assert features.main(argv) == 2
    assert error_line(capsys) == (f"error: {tmp_path / 'f' / 'P1' / '1.npz'}: cannot be written (No space left on "
                                  f"device): the disk is full: free space, then run the same command again (it goes "
                                  f"on from the images written).")
    assert sorted(p.name for p in (tmp_path / "f" / "P1").iterdir()) == ["0.npz"]
    monkeypatch.setattr(np, "savez", savez)
    assert features.main(argv) == 0 and "extracting grid features of 1 images" in capsys.readouterr().err


def test_extract_that_finds_no_images_is_an_error_that_says_why(tmp_path, monkeypatch, capsys):
    """--extract made nothing and exited 0: images that lie in the folder itself (not in {id}/ folders), an
    image whose name has two files (P1/0.jpg and P1/0.png: both skipped); an item folder that cannot be
    listed was a PermissionError traceback. Each is exit 2 and one line."""
    argv = extract_argv(tmp_path, monkeypatch, tmp_path / "f")
    images = tmp_path / "images"
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (32, 32)).save(flat / "0.jpg")
    assert features.main(argv[:1] + [str(flat)] + argv[2:]) == 2
    assert error_line(capsys) == (f"error: --extract {flat}: no image files (.jpg, .jpeg, .png, .gif, .webp, .bmp, "
                                  f".tif, .tiff) in its sub-folders. It must hold one folder per product/review id "
                                  f"with its images, {{id}}/{{k}}.jpg, as images.tsv of build_data.py lays them out.")
    Image.new("RGB", (32, 32)).save(images / "P1" / "0.jpg")
    Image.new("RGB", (32, 32)).save(images / "P1" / "1.jpg")
    assert features.main(argv) == 2
    assert error_line(capsys) == ("error: --extract: none of the 2 images was extracted (each skipped above); 2 with "
                                  "several files each: keep one.")
    scandir = os.scandir

    def unreadable(path):
        if Path(path).name == "P1":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", unreadable)
    assert features.main(argv) == 2
    assert error_line(capsys) == (f"error: --extract {images}: cannot read {images / 'P1'} (Permission denied); "
                                  f"make it readable.")


def test_linked_images_and_item_folders_are_read(tmp_path, monkeypatch, capsys):
    """Images that are links (git-annex and DVC make every file one) and item folders that are links were left
    out unsaid: --extract exited 0 having read none of them. A link to nothing is listed as skipped."""
    argv = extract_argv(tmp_path, monkeypatch, tmp_path / "f")
    elsewhere = tmp_path / "cache"
    (elsewhere / "P2").mkdir(parents=True)
    (tmp_path / "images" / "P1" / "0.png").rename(elsewhere / "a.png")
    (tmp_path / "images" / "P1" / "0.png").symlink_to(elsewhere / "a.png")
    (tmp_path / "images" / "P1" / "1.png").unlink()
    (tmp_path / "images" / "P1" / "1.png").symlink_to(elsewhere / "gone.png")
    Image.new("RGB", (32, 32)).save(elsewhere / "P2" / "0.png")
    (tmp_path / "images" / "P2").symlink_to(elsewhere / "P2")
    assert features.main(argv) == 0
    written = sorted(str(p.relative_to(tmp_path / "f")) for p in (tmp_path / "f").glob("*/*.npz"))
    assert written == ["P1/0.npz", "P2/0.npz"]
    assert (f"skipped {tmp_path / 'images' / 'P1' / '1.png'}: a link to {elsewhere / 'gone.png'}, which does not "
            f"exist") in capsys.readouterr().err


def test_an_image_changed_after_its_features_is_extracted_again(tmp_path, monkeypatch, capsys):
    """An image fetched again (the full-size image for a thumbnail) kept the features of the old one unsaid:
    a resumed --extract skipped every image with a .npz. Now one changed after its .npz is extracted again."""
    argv = extract_argv(tmp_path, monkeypatch, tmp_path / "f")
    assert features.main(argv) == 0 and "extracting grid features of 2 images" in capsys.readouterr().err
    image, npz = tmp_path / "images" / "P1" / "0.png", tmp_path / "f" / "P1" / "0.npz"
    with np.load(npz) as saved:
        before = saved["x"][0, 0]
    Image.new("RGB", (64, 32), (255, 255, 255)).save(image)
    written = npz.stat().st_mtime_ns - 100 * 10 ** 9  # the features written 100 s ago, the image fetched 99 s ago
    os.utime(npz, ns=(written, written))
    os.utime(image, ns=(written + 10 ** 9,) * 2)
    assert features.main(argv) == 0 and "extracting grid features of 1 images" in capsys.readouterr().err
    with np.load(npz) as saved:
        assert saved["x"][0, 0] != before and (int(saved["image_h"]), int(saved["image_w"])) == (32, 64)
    assert features.main(argv) == 0 and "extracting grid features of 0 images" in capsys.readouterr().err


def test_an_image_added_under_the_name_of_an_extracted_one_is_reported(tmp_path, monkeypatch, capsys):
    """P1/0.jpg added beside P1/0.png, whose features P1/0.npz holds: one name, two images. It was left out
    unsaid (its .npz existed); now it is listed as skipped on every run and 0.npz is left as it was."""
    argv = extract_argv(tmp_path, monkeypatch, tmp_path / "f")
    assert features.main(argv) == 0
    npz = tmp_path / "f" / "P1" / "0.npz"
    before = npz.read_bytes()
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "images" / "P1" / "0.jpg")
    now, folder = npz.stat().st_mtime_ns, tmp_path / "images" / "P1"
    for path, age in ((folder / "0.png", 100), (npz, 50), (folder / "0.jpg", 10)):  # fetched, extracted, added
        os.utime(path, ns=(now - age * 10 ** 9,) * 2)
    assert features.main(argv) == 0
    assert f"skipped {tmp_path / 'images' / 'P1'}/0.*: 2 files for one image (0.jpg, 0.png)" in capsys.readouterr().err
    assert npz.read_bytes() == before
