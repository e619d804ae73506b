"""Every kind of bad image: skipped and counted, or converted; the batch always survives."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sophiavl_mcore.data.config import ImageConfig
from sophiavl_mcore.data.errors import SKIP_REASONS
from sophiavl_mcore.data.images import ImageLoader
from sophiavl_mcore.data.synthetic import encode, natural_image, write_png_rows

pytestmark = pytest.mark.timeout(300)  # nothing may hang


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    img = natural_image(120, 160, rng)
    good = encode(img, "JPEG", quality=92)
    f = {}

    def put(name: str, data: bytes) -> None:
        (d / name).write_bytes(data)
        f[name] = str(d / name)

    put("good.jpg", good)
    put("good2.png", encode(natural_image(90, 70, rng), "PNG"))
    put("truncated.jpg", good[: len(good) // 2])
    put("zero.jpg", b"")
    put("garbage.jpg", b"\xff\xd8\xff" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    put("text.jpg", b"this is not an image at all\n" * 20)
    dht = bytearray(good)  # header fine for PIL, Huffman table broken: only the decoder sees it
    i = good.find(b"\xff\xc4")
    dht[i + 5 : i + 21] = b"\xff" * 16
    put("bad_huffman.jpg", bytes(dht))
    put("one.png", encode(np.array([[[200, 10, 10]]], np.uint8), "PNG"))
    put("thin.png", encode(np.zeros((1, 300, 3), np.uint8), "PNG"))
    put("cmyk.jpg", encode(Image.fromarray(img).convert("CMYK"), "JPEG", quality=95))
    rgba = np.dstack([img, np.zeros(img.shape[:2], np.uint8)])
    rgba[:60, :, 3] = 255  # top half opaque, bottom half fully transparent
    put("alpha.png", encode(rgba, "PNG"))
    frames = [Image.new("RGB", (64, 48), (250, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    put("anim.gif", buf.getvalue())
    gray16 = (np.arange(80, dtype=np.uint16) * 800)[None, :, None].repeat(56, 0)
    write_png_rows(d / "gray16.png", 56, 80, channels=1, bit_depth=16, row=gray16[0])
    f["gray16.png"] = str(d / "gray16.png")
    f["missing.jpg"] = str(d / "does_not_exist.jpg")
    return f


def load_one(loader, path):
    batch = loader.load([path])
    return batch, batch.skipped.get(0)


@pytest.fixture(scope="module")
def loader():
    return ImageLoader(ImageConfig(device="cpu", batch_size=4))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated.jpg", "truncated"), ("zero.jpg", "empty"), ("garbage.jpg", "unreadable"),
        ("text.jpg", "unreadable"), ("missing.jpg", "missing"), ("bad_huffman.jpg", "decode_error"),
        ("thin.png", "aspect_ratio"),
    ],
)
def test_bad_file_is_skipped_with_reason(files, name, reason):
    ld = ImageLoader(ImageConfig(device="cpu"))
    batch, got = load_one(ld, files[name])
    assert got == reason and batch.images == [None] and batch.pixel_values.shape[0] == 0
    assert ld.metrics()[f"data/skipped_{reason}"] == 1.0
    assert sum(v for k, v in ld.metrics().items() if k.startswith("data/skipped_")) == 1.0


def test_huge_image_is_refused_before_decoding(huge_png):
    ld = ImageLoader(ImageConfig(device="cpu"))
    batch, got = load_one(ld, str(huge_png))
    assert got == "too_large"
    # a limit above PIL's own bomb check still refuses it by our limit, with the numbers
    ld2 = ImageLoader(ImageConfig(device="cpu", max_decode_pixels=10**8))
    assert load_one(ld2, str(huge_png))[1] == "too_large"


def test_one_pixel_image_is_upscaled_unless_min_side(files, loader):
    batch, got = load_one(loader, files["one.png"])
    assert got is None and batch.image_grid_thw.tolist() == [[1, 4, 4]]
    assert (batch.images[0] == [200, 10, 10]).all()  # a constant image stays constant
    strict = ImageLoader(ImageConfig(device="cpu", min_side=8))
    assert load_one(strict, files["one.png"])[1] == "too_small"


def test_cmyk_jpeg_decodes_like_pil(files, loader):
    batch, got = load_one(loader, files["cmyk.jpg"])
    assert got is None
    ref = np.asarray(Image.open(files["cmyk.jpg"]).convert("RGB").resize((168, 112), Image.BICUBIC))
    assert batch.images[0].shape == (112, 168, 3)
    assert np.abs(batch.images[0].astype(int) - ref).mean() < 2.0


def test_alpha_is_composited_on_white(files, loader):
    batch, got = load_one(loader, files["alpha.png"])
    assert got is None and loader.metrics()["data/converted_alpha"] >= 1
    img = batch.images[0]
    assert (img[-20:] == 255).all()  # transparent half is white, not black
    assert img[:40].mean() < 250  # opaque half keeps its content


def test_gif_uses_first_frame(files, loader):
    batch, got = load_one(loader, files["anim.gif"])
    assert got is None
    mean = batch.images[0].reshape(-1, 3).mean(0)
    assert mean[0] > 200 and mean[2] < 30  # red first frame, not the blue second


def test_16bit_png_is_scaled_not_clipped(files, loader):
    batch, got = load_one(loader, files["gray16.png"])
    assert got is None
    row = batch.images[0][28, :, 0].astype(int)
    # ramp 0..63200 of 65535 → 0..~246 in 8 bits; clipping at 255 would saturate at x≥1
    assert row[0] < 5 and 230 < row[-1] < 250 and np.all(np.diff(row) >= -2)


def test_mixed_batch_keeps_every_good_sample(files, huge_png):
    ld = ImageLoader(ImageConfig(device="cpu", batch_size=4))
    order = ["good.jpg", "bad_huffman.jpg", "zero.jpg", "good2.png", "truncated.jpg",
             "cmyk.jpg", "missing.jpg", "bad_huffman.jpg", "anim.gif", "garbage.jpg",
             "thin.png", "alpha.png", "gray16.png", "one.png"]
    paths = [files[n] for n in order] + [str(huge_png), None]
    batch = ld.load(paths)
    good = {0, 3, 5, 8, 11, 12, 13}
    assert {i for i, im in enumerate(batch.images) if im is not None} == good
    assert batch.skipped == {1: "decode_error", 2: "empty", 4: "truncated", 6: "missing",
                             7: "decode_error", 9: "unreadable", 10: "aspect_ratio",
                             14: "too_large"}
    assert batch.image_grid_thw.shape == (len(good), 3)
    assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(1).sum())
    m = ld.metrics()
    assert set(m) >= {f"data/skipped_{r}" for r in SKIP_REASONS}
    assert m["data/skipped_decode_error"] == 2 and m["data/images_loaded"] == len(good)
    again = ld.load(paths)  # the pipeline is still usable after decode errors
    assert torch_equal(again.pixel_values, batch.pixel_values)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
