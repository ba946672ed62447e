"""One model-input decode for every path: a JPEG decoded at the DCT scale its model needs, whether it is
indexed, uploaded, labelled from the CLI, calibrated or trained on (`DecodedImage.model_input`)."""

from __future__ import annotations

import dataclasses
import io
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from cxrmodel.imaging.decode import ImageLimits, decode_bytes, jpeg_scale, load_image
from cxrmodel.imaging.preprocess import ImagePreprocess


def _textured(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Noise over a gradient: fine detail, so a reduced decode and a full one give visibly other pixels."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 160, w)[None, :] + np.linspace(0, 60, h)[:, None]
    return Image.fromarray(np.clip(ramp + rng.normal(0, 40, (h, w)), 0, 255).astype(np.uint8))


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size,side", [((2800, 2300), 448), ((600, 480), 64), ((896, 2000), 448), ((895, 2000), 448),
                                       ((300, 200), 448), ((4000, 4000), 448), ((128, 129), 64)])
def test_jpeg_scale_is_the_scale_pillow_decodes_at(size, side):
    im = Image.open(io.BytesIO(_jpeg(Image.new("L", size))))
    im.draft(im.mode, (side, side))
    assert im.size == tuple(-(-n // jpeg_scale(size, side)) for n in size)


def test_a_jpeg_decoded_for_a_model_keeps_twice_its_input_and_the_files_size():
    side = ImagePreprocess(shortest_edge=224, crop=(224, 224)).decode_side
    assert side == 448
    decoded = decode_bytes(_jpeg(_textured((2000, 1400))), "x.jpg", model_side=side)
    assert decoded.image.size == (1000, 700)  # 1/2; 1/4 would leave the short side under 448
    assert decoded.file_size == (2000, 1400)
    assert decoded.encoded is None  # decoded for the model alone: nothing more to decode
    assert decode_bytes(_jpeg(_textured((1000, 700))), "y.jpg", model_side=side).image.size == (1000, 700)


def test_other_formats_decode_in_full_for_a_model():
    buf = io.BytesIO()
    _textured((1000, 700)).save(buf, format="PNG")
    decoded = decode_bytes(buf.getvalue(), "x.png", model_side=64)
    assert decoded.image.size == decoded.file_size == (1000, 700) and decoded.source_size is None


def test_a_display_decode_gives_the_model_the_same_view_once():
    data = _jpeg(_textured((1200, 900)))
    model_only = decode_bytes(data, "x.jpg", model_side=64)
    shown = decode_bytes(data, "x.jpg")
    assert shown.image.size == (1200, 900)
    view = shown.for_model(64)
    assert view.image.size == model_only.image.size == (150, 113) and view.reduced_by == 8
    assert np.array_equal(np.asarray(view.image), np.asarray(model_only.image))
    assert shown.for_model(64) is view  # decoded once, kept
    preprocess = ImagePreprocess(shortest_edge=32, crop=(32, 32))
    assert shown.model_input(preprocess) is shown.model_input(preprocess)  # resized once, kept
    small = decode_bytes(_jpeg(_textured((100, 90))), "s.jpg")
    assert small.for_model(64) is small  # the scale would be 1: no second decode


def test_an_upload_reduced_for_display_still_gives_the_models_view():
    data = _jpeg(_textured((1200, 900)))
    shown = decode_bytes(data, "x.jpg", limits=ImageLimits(max_side=500))
    assert shown.image.size == (600, 450) and shown.file_size == (1200, 900) and shown.reduced_by == 2
    preprocess = ImagePreprocess(shortest_edge=32, crop=(32, 32))
    assert np.array_equal(np.asarray(shown.model_input(preprocess)),
                          np.asarray(decode_bytes(data, "x.jpg", model_side=64).model_input(preprocess)))


@pytest.mark.parametrize("size", [(311, 256), (256, 379), (1001, 777)])
def test_a_reduced_decode_crops_the_same_part_as_a_full_one(size):
    """A reduced decode's last column and row are rounded up (311 px at 1/4 is 78, not 77.75), so resizing
    it as it is would shift the crop by a pixel of the model's input."""
    y, x = np.mgrid[: size[1], : size[0]]
    waves = 128 + 60 * np.sin(2 * np.pi * x / 37) + 60 * np.cos(2 * np.pi * y / 41)  # smooth, so only geometry counts
    data = _jpeg(Image.fromarray(waves.astype(np.uint8)))
    preprocess = ImagePreprocess(shortest_edge=32, crop=(32, 32))
    full = np.asarray(preprocess.resize(decode_bytes(data, "x.jpg").image), dtype=float)
    view = decode_bytes(data, "x.jpg", model_side=preprocess.decode_side)
    assert view.reduced_by > 1
    as_the_file = np.abs(np.asarray(view.model_input(preprocess), dtype=float) - full).mean()
    as_decoded = np.abs(np.asarray(preprocess.resize(view.image), dtype=float) - full).mean()
    assert as_the_file < 1.5 and as_decoded > 2 * as_the_file


@pytest.mark.parametrize("fmt", ["png", "dcm"])
def test_an_upload_reduced_by_a_whole_factor_is_resized_as_the_whole_file(fmt, tmp_path):
    """Formats without a reduced decode are shrunk for display by a whole factor (a 1001 px side by 3 is 334,
    not 333.7): the model's input is still cut from where the full image's would be."""
    from tests.imagegen import write_dicom

    y, x = np.mgrid[:777, :1001]
    waves = (128 + 60 * np.sin(2 * np.pi * x / 37) + 60 * np.cos(2 * np.pi * y / 41)).astype(np.uint8)
    if fmt == "png":
        buf = io.BytesIO()
        Image.fromarray(waves).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = write_dicom(tmp_path / "w.dcm", waves).read_bytes()
    full = decode_bytes(data, f"w.{fmt}")
    shown = decode_bytes(data, f"w.{fmt}", limits=ImageLimits(max_side=300))
    assert shown.image.size == (334, 259) and shown.file_size == (1001, 777) and shown.reduced_by == 3
    for reducing_gap in (None, 3.0):  # the geometry alone, then with the block averaging both paths start with
        preprocess = ImagePreprocess(shortest_edge=32, crop=(32, 32), reducing_gap=reducing_gap)
        gap = np.abs(np.asarray(shown.model_input(preprocess), dtype=float)
                     - np.asarray(full.model_input(preprocess), dtype=float)).mean()
        shifted = np.abs(np.asarray(preprocess.resize(shown.image), dtype=float)
                         - np.asarray(full.model_input(preprocess), dtype=float)).mean()
        assert gap < 1.5 and shifted > (2 * gap if reducing_gap is None else gap)
        # told which model it is for, the display decode makes that model's input before it shrinks: exact
        told = decode_bytes(data, f"w.{fmt}", limits=ImageLimits(max_side=300), model_preprocess=preprocess)
        assert told.image.size == (334, 259)
        assert np.array_equal(np.asarray(told.model_input(preprocess)), np.asarray(full.model_input(preprocess)))


@pytest.mark.parametrize("fmt", ["png", "dcm", "png16"])
def test_an_indexed_file_uploaded_again_at_any_size_finds_its_stored_vector(fmt, tmp_path, tiny_encoder):
    """Over the upload side a PNG or DICOM is shrunk for display; the model is still given what the index gave it."""
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig
    from tests.imagegen import write_dicom

    folder = tmp_path / "src"
    folder.mkdir()
    film = np.asarray(_textured((1001, 777), seed=7))
    if fmt == "dcm":
        path = write_dicom(folder / "film.dcm", film.astype(np.uint16) * 16)
    else:
        path = folder / "film.png"
        Image.fromarray(film.astype(np.uint16) * 257 if fmt == "png16" else film).save(path)
    data = tmp_path / "data"
    run_index(IndexJob(sources=[str(folder)], data_dir=data, workers=0, progress=False), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data, upload_side=300), encoder=tiny_encoder)
    image_id, stored = _stored(engine, path.name)
    upload = engine.decode_upload(path.read_bytes(), path.name)
    assert upload.image.size == (334, 259)  # shrunk for display by 3
    assert float(np.abs(engine.embed(upload) - stored).max()) < 1e-6
    assert engine.image(upload, k=1)[0].id == image_id
    engine.close()


def _resized_and_reduce_calls(preprocess: ImagePreprocess, image: Image.Image):
    with mock.patch.object(Image.Image, "reduce", autospec=True, side_effect=Image.Image.reduce) as reduce:
        out = np.asarray(preprocess.resize(image), dtype=float)
    return out, [call.args[1] for call in reduce.call_args_list]


@pytest.mark.parametrize("size,factor", [((2500, 3000), 3), ((3000, 2400), 3), ((1344, 1400), 2)])
def test_a_film_many_times_the_input_is_averaged_over_blocks_before_the_bicubic_pass(size, factor):
    """Over 6 x the model's input the bicubic pass starts from whole-block averages (Pillow's `reduce`; a
    3000 x 2500 film resizes ~5x faster), and stays within a level or so of resampling the full image."""
    film = _textured(size)  # heavy pixel noise: the hardest case for block averaging
    preprocess = ImagePreprocess()  # ViT-B/32: 224
    fast, calls = _resized_and_reduce_calls(preprocess, film)
    exact, exact_calls = _resized_and_reduce_calls(dataclasses.replace(preprocess, reducing_gap=None), film)
    assert calls == [(factor, factor)] and exact_calls == []
    assert fast.shape == exact.shape == (224, 224)
    assert np.abs(fast - exact).mean() < 1.0 and np.abs(fast - exact).max() <= 6


@pytest.mark.parametrize("size", [(1343, 1343), (300, 1900), (256, 256)])
def test_an_image_under_six_times_the_input_is_resized_exactly_as_before(size):
    """Every image of the shared corpus (256 px at most) is under it: for them nothing changed, so the bundled
    model's calibration still describes what it is given."""
    image = _textured(size, seed=2)
    for preprocess in (ImagePreprocess(), ImagePreprocess(shortest_edge=64, crop=(64, 64))):
        if min(size) >= 6 * preprocess.output_size[0]:
            continue
        fast, calls = _resized_and_reduce_calls(preprocess, image)
        exact, _ = _resized_and_reduce_calls(dataclasses.replace(preprocess, reducing_gap=None), image)
        assert calls == [] and np.array_equal(fast, exact)


def test_an_exif_rotated_jpeg_reports_its_size_as_shown():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    _textured((901, 900)).save(buf, format="JPEG", exif=exif.tobytes())
    decoded = decode_bytes(buf.getvalue(), "r.jpg", model_side=64)
    assert decoded.image.size == (900, 901)  # turned: decoded in full (a reduced decode's rounded edge would move)
    shown = decode_bytes(buf.getvalue(), "r.jpg", limits=ImageLimits(max_side=200))
    assert shown.image.size == (225, 226) and shown.file_size == (900, 901)


@pytest.fixture(scope="module")
def jpeg_index(tmp_path_factory, tiny_encoder):
    """A data dir indexing one large textured JPEG (and a PNG beside it)."""
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig

    folder = tmp_path_factory.mktemp("jpegs")
    (folder / "film.jpg").write_bytes(_jpeg(_textured((1100, 900), seed=3)))
    _textured((300, 260), seed=4).save(folder / "other.png")
    data = tmp_path_factory.mktemp("jpeg-data")
    run_index(IndexJob(sources=[str(folder)], data_dir=data, workers=0, progress=False), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    yield engine, folder
    engine.close()


def _stored(engine, name: str) -> tuple[int, np.ndarray]:
    state = engine.state()
    for image_id in range(1, 10):
        record = engine.get(image_id, state)
        if record and record["file_name"] == name:
            return image_id, engine.catalog.vector(image_id, state.generation)
    raise AssertionError(f"{name} not indexed")


def test_every_path_embeds_an_indexed_jpeg_as_the_index_did(jpeg_index, tiny_encoder):
    from cxrmodel.training.pairs import Pair
    from cxrmodel.training.train import PairImages
    from indexer.prepare import PrepareTask, prepare

    engine, folder = jpeg_index
    path = folder / "film.jpg"
    image_id, stored = _stored(engine, "film.jpg")
    record = engine.get(image_id)
    assert (record["width"], record["height"]) == (1100, 900)  # the file's size, not the decoded one

    def gap(vector):
        return float(np.abs(vector - stored).max())

    full = tiny_encoder.encode_images([load_image(path).image])[0]
    assert gap(full) > 1e-4  # the checks below can tell a full decode from the model's view

    upload = engine.decode_upload(path.read_bytes(), "film.jpg")
    assert gap(engine.embed(upload)) < 1e-5
    assert engine.image(upload, k=1)[0].id == image_id
    assert gap(engine.embed(engine.load(image_id))) < 1e-5  # labels of an indexed image
    assert gap(engine.embed(load_image(path))) < 1e-5  # `radlens label FILE`, `radlens similar FILE`

    preprocess = tiny_encoder.preprocess
    indexed_pixels = prepare(PrepareTask(str(path)), preprocess, engine.config.limits).pixels
    trained_pixels = PairImages([Pair(image=str(path), caption="a film")], preprocess)[0][0]
    assert np.array_equal(indexed_pixels, trained_pixels)
