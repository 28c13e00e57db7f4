"""Face detection, alignment, photo decoding and ``prepare_data.py --align`` on real faces that install with the
project (scikit-image's sample photos), no downloads.

References are independent of the code under test: landmarks of ``skimage.data.astronaut()`` annotated by hand
from a zoomed view, the ArcFace template constants, similarity transforms chosen by the test, and pixel values.
"""

import csv
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage.transform import SimilarityTransform, warp

from keras_insightface.cli import prepare as prepare_cli
from keras_insightface.faces import alignment
from keras_insightface.faces import detector as face_detector
from keras_insightface.tools import prepare_data

# Hand-annotated (x, y) in pixel-centre coordinates: iris centres, nose tip, mouth corners (left = image left).
ASTRONAUT_LANDMARKS = np.array([[202.3, 100.1], [246.7, 102.8], [222.9, 126.6], [203.5, 140.0], [241.8, 141.0]])
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


@pytest.fixture(scope="module")
def detector():
    return face_detector.FaceDetector()


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()


def small_astronaut(size=256):
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BILINEAR))


def paste(image, transform, shape, background):
    """``image`` warped by ``transform`` into a canvas of ``shape`` (height, width) filled with ``background``."""
    return warp(image, transform.inverse, output_shape=shape, preserve_range=True, cval=background).astype(np.uint8)


def dark_centroid(crop, center, half_width=9, half_height=6, count=20):
    """Centre of the ``count`` darkest pixels in a window around ``center``: where the iris is in a crop."""
    gray = crop.astype(np.float64).mean(axis=-1)
    x0, y0 = int(round(center[0])), int(round(center[1]))
    window = gray[y0 - half_height : y0 + half_height + 1, x0 - half_width : x0 + half_width + 1]
    ys, xs = np.unravel_index(np.argsort(window, axis=None)[:count], window.shape)
    return np.array([xs.mean() + x0 - half_width, ys.mean() + y0 - half_height])


# ---------------------------------------------------------------------------------------------------------
# Detection and alignment.
# ---------------------------------------------------------------------------------------------------------
def test_astronaut_one_face_landmarks_match_hand_annotation(detector, astronaut):
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    errors = np.linalg.norm(faces[0].landmarks - ASTRONAUT_LANDMARKS, axis=1)
    assert errors[:3].max() < 2.0  # eyes and nose tip
    assert errors[3:].max() < 3.0  # mouth corners: the detector's corners sit a little outside the lip line
    assert faces[0].score > 0.99
    x1, y1, x2, y2 = faces[0].box
    assert x1 < ASTRONAUT_LANDMARKS[:, 0].min() and x2 > ASTRONAUT_LANDMARKS[:, 0].max()
    assert y1 < ASTRONAUT_LANDMARKS[:, 1].min() and y2 > ASTRONAUT_LANDMARKS[:, 1].max()


def test_astronaut_aligned_crop_puts_the_eyes_on_the_template(detector, astronaut):
    face = detector.detect(astronaut)[0]
    crop = face_detector.align_faces(astronaut, [face])[0]
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    # where the detected eyes land in the crop
    transform = alignment.estimate_alignment(face.landmarks)
    assert np.linalg.norm(transform(face.landmarks[:2]) - TEMPLATE[:2], axis=1).max() < 3.0
    # where the eyes really are in the crop's pixels: the iris is the darkest blob around each template eye.
    # A 5-point least-squares fit cannot put every point of this smiling face on the average template; the
    # measured eyes are 2.8 and 3.3 px away.
    for eye in TEMPLATE[:2]:
        assert np.linalg.norm(dark_centroid(crop, eye) - eye) < 3.5
    # the crop's pixels are the photo's pixels at the mapped positions (bilinear, checked at the nose tip)
    nose = np.round(transform(ASTRONAUT_LANDMARKS[2:3])[0]).astype(int)
    source = transform.inverse(nose[None].astype(float))[0]
    x0, y0 = np.floor(source).astype(int)
    fx, fy = source - [x0, y0]
    patch = astronaut[y0 : y0 + 2, x0 : x0 + 2].astype(np.float64)
    expected = (patch[0, 0] * (1 - fx) + patch[0, 1] * fx) * (1 - fy) + (patch[1, 0] * (1 - fx) + patch[1, 1] * fx) * fy
    assert np.abs(crop[nose[1], nose[0]] - expected).max() <= 1.0


def test_any_crop_size_keeps_the_face_proportions(detector, astronaut):
    face = detector.detect(astronaut)[0]
    crop = face_detector.align_faces(astronaut, [face], image_size=(112, 96))[0]
    assert crop.shape == (112, 96, 3)
    # 112x96 is the classic SphereFace / CosFace crop: the same face, 8 pixels narrower on each side
    classic = np.array(
        [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]]
    )
    np.testing.assert_allclose(alignment.alignment_template((112, 96)), classic, atol=1e-4)
    full = face_detector.align_faces(astronaut, [face])[0]
    assert np.abs(crop.astype(int) - full[:, 8:104]).mean() < 1.0
    np.testing.assert_allclose(alignment.alignment_template((224, 224)), TEMPLATE * 2, atol=1e-4)
    big = face_detector.align_faces(astronaut, [face], image_size=(224, 224))[0]
    small = np.asarray(Image.fromarray(big).resize((112, 112), Image.BILINEAR)).astype(int)
    assert np.abs(small - full).mean() < 6.0


def test_pasted_faces_recovered_under_known_similarity_transforms(detector, astronaut):
    """The astronaut warped into larger canvases by chosen similarity transforms: the landmarks found in each
    canvas are the transformed landmarks of the original photo, within 2 px on average; detecting the equal-sized
    canvases as one batch gives the same landmarks as one by one."""
    reference = detector.detect(astronaut)[0].landmarks
    rng = np.random.default_rng(3)
    canvases, transforms = [], []
    for _ in range(6):
        scale, angle = rng.uniform(0.6, 1.25), rng.uniform(-0.35, 0.35)
        center = SimilarityTransform(scale=scale, rotation=angle)(np.array([[224.0, 120.0]]))[0]
        shift = np.array([400.0, 300.0]) - center + rng.uniform(-150, 150, 2)
        transforms.append(SimilarityTransform(scale=scale, rotation=angle, translation=shift))
        canvases.append(paste(astronaut, transforms[-1], (600, 800), rng.uniform(0, 255)))
    found = detector.detect_batch(canvases)
    for transform, faces in zip(transforms, found):
        assert len(faces) == 1
        assert np.linalg.norm(faces[0].landmarks - transform(reference), axis=1).mean() < 2.0
        # and against the hand annotation, in the original photo's pixels
        error = np.linalg.norm(faces[0].landmarks - transform(ASTRONAUT_LANDMARKS), axis=1).mean() / transform.scale
        assert error < 2.5
    one_by_one = detector.detect(canvases[0])
    np.testing.assert_allclose(one_by_one[0].landmarks, found[0][0].landmarks, atol=0.05)


def test_large_photos_are_shrunk_for_detection_only(astronaut):
    shrinking = face_detector.FaceDetector(max_side=256)
    faces = shrinking.detect(astronaut)  # 512 px photo detected at 256 px, coordinates in the 512 px photo
    assert len(faces) == 1
    assert np.linalg.norm(faces[0].landmarks - ASTRONAUT_LANDMARKS, axis=1).mean() < 3.0


def test_no_face_and_tiny_images(detector):
    assert detector.detect(skimage.data.coffee()) == []
    assert detector.detect(np.zeros((1, 1, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((20, 20), np.uint8))


def test_select_faces_largest_central_all(detector):
    small = small_astronaut(128)
    canvas = np.full((300, 700, 3), 90, np.uint8)
    canvas[150:278, 20:148] = small  # small face, low left
    canvas[22:278, 300:556] = small_astronaut(256)  # large face, near the centre
    canvas[86:214, 560:688] = small  # small face, right
    faces = detector.detect(canvas)
    assert len(faces) == 3
    largest = face_detector.select_faces(faces, canvas.shape, "largest")
    assert len(largest) == 1 and 300 < largest[0].box[0] < 556
    everything = face_detector.select_faces(faces, canvas.shape, "all")
    assert [face.area for face in everything] == sorted((face.area for face in faces), reverse=True)
    # a centred small face wins "central" over an off-centre large one
    central_canvas = np.full((400, 900, 3), 90, np.uint8)
    central_canvas[136:264, 386:514] = small
    central_canvas[72:328, 10:266] = small_astronaut(256)
    faces = detector.detect(central_canvas)
    central = face_detector.select_faces(faces, central_canvas.shape, "central")
    assert 386 < central[0].box[0] < 514
    assert face_detector.select_faces([], (10, 10, 3), "largest") == []
    with pytest.raises(ValueError, match="keep must be one of"):
        face_detector.select_faces(faces, central_canvas.shape, "first")


# ---------------------------------------------------------------------------------------------------------
# Reading photos as they come.
# ---------------------------------------------------------------------------------------------------------
def save_exif_rotated(path, upright, orientation=6):
    """Store ``upright`` rotated as a camera would, with the EXIF orientation that shows it upright."""
    stored = Image.fromarray(upright).rotate(90, expand=True)  # orientation 6: display turns it 90 deg clockwise
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif.tobytes())


def test_load_image_exif_cmyk_gray_alpha_16bit(tmp_path):
    upright = small_astronaut(128)
    save_exif_rotated(tmp_path / "rotated.jpg", upright)
    loaded = face_detector.load_image(str(tmp_path / "rotated.jpg"))
    assert loaded.shape == upright.shape and np.abs(loaded.astype(int) - upright).mean() < 4

    Image.fromarray(upright).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    cmyk = face_detector.load_image(str(tmp_path / "cmyk.jpg"))
    assert cmyk.shape == upright.shape and np.abs(cmyk.astype(int) - upright).mean() < 6

    gray = upright[..., 1]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(face_detector.load_image(str(tmp_path / "gray.png")), np.stack([gray] * 3, -1))

    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # 16-bit grayscale PNG
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    np.testing.assert_array_equal(face_detector.load_image(str(tmp_path / "gray16.png")), np.stack([gray] * 3, -1))

    rgba = np.concatenate([upright, np.full(upright.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    rgba[:, :64, 3] = 0  # left half transparent: composited on white
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with_alpha = face_detector.load_image(str(tmp_path / "alpha.png"))
    assert (with_alpha[:, :64] == 255).all()
    np.testing.assert_array_equal(with_alpha[:, 64:], upright[:, 64:])

    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    np.testing.assert_array_equal(face_detector.load_image(str(tmp_path / "dot.png")), [[[10, 20, 30]]])
    assert face_detector.load_image((tmp_path / "dot.png").read_bytes()).shape == (1, 1, 3)


def test_load_image_16bit_rgb_png(tmp_path):
    import tensorflow as tf

    upright = small_astronaut(64)
    (tmp_path / "rgb16.png").write_bytes(tf.io.encode_png(upright.astype(np.uint16) * 257).numpy())
    np.testing.assert_array_equal(face_detector.load_image(str(tmp_path / "rgb16.png")), upright)


def test_load_image_rejects_non_images(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image at all\n")
    with pytest.raises(face_detector.UnreadableImageError, match="notes.jpg: cannot read image"):
        face_detector.load_image(str(tmp_path / "notes.jpg"))
    Image.fromarray(small_astronaut(64)).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:300])  # truncated
    with pytest.raises(ValueError, match="cut.jpg"):
        face_detector.load_image(str(tmp_path / "cut.jpg"))
    with pytest.raises(FileNotFoundError):
        face_detector.load_image(str(tmp_path / "missing.jpg"))


# ---------------------------------------------------------------------------------------------------------
# prepare_data.py --align
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    """Two identities of raw photos, with every kind of trouble a real folder has."""
    root = tmp_path_factory.mktemp("raw")
    face = small_astronaut(256)
    os.makedirs(root / "anna")
    os.makedirs(root / "bob")
    Image.fromarray(face).save(root / "anna" / "plain.jpg", quality=95)
    save_exif_rotated(root / "anna" / "phone.jpg", face)
    Image.fromarray(face).convert("CMYK").save(root / "anna" / "print.jpg", quality=95)
    Image.fromarray(face).save(root / "anna" / "plain.png")  # same stem as plain.jpg
    (root / "bob" / "notes.jpg").write_text("a text file named like a photo\n")
    Image.fromarray(skimage.data.coffee()).save(root / "bob" / "coffee.jpg")
    Image.new("RGB", (1, 1), (200, 100, 50)).save(root / "bob" / "dot.png")
    pair = np.full((256, 600, 3), 128, np.uint8)
    pair[:, :256], pair[64:192, 400:528] = face, small_astronaut(128)
    Image.fromarray(pair).save(root / "bob" / "group.jpg", quality=95)
    Image.fromarray(face[..., 0].astype(np.uint16) * 257).save(root / "bob" / "scan16.png")
    return str(root)


def read_report(path):
    with open(path, newline="") as ff:
        return {row["image"]: row for row in csv.DictReader(ff)}


def test_align_folder_reports_bad_input_and_resumes(raw_folder, detector, tmp_path):
    out = str(tmp_path / "aligned")
    bin_path = str(tmp_path / "pairs.bin")
    status = prepare_cli.main(["--align", raw_folder, "-o", out, "--bin", bin_path, "--pairs", "4", "--workers", "2"])
    assert status == 0
    report = read_report(os.path.join(out, "align_report.csv"))
    assert {name: row["status"] for name, row in report.items()} == {
        os.path.join("bob", "notes.jpg"): "unreadable",
        os.path.join("bob", "coffee.jpg"): "no_face",
        os.path.join("bob", "dot.png"): "no_face",
        os.path.join("bob", "group.jpg"): "several_faces",
    }
    assert report[os.path.join("bob", "group.jpg")]["faces"] == "2"
    assert "1x1" in report[os.path.join("bob", "dot.png")]["detail"]
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    crops = ["anna/phone.jpg", "anna/plain_jpg.jpg", "anna/plain_png.jpg", "anna/print.jpg"]
    crops += ["bob/group.jpg", "bob/scan16.jpg"]
    assert written == sorted([*crops, ".align_journal.csv", ".align_options.json", "align_report.csv"])
    for name in crops:  # every crop: 112x112, the face on the template (eyes dark where the template puts them)
        crop = np.asarray(Image.open(os.path.join(out, name)))
        assert crop.shape == (112, 112, 3)
        for eye in TEMPLATE[:2]:
            assert np.linalg.norm(dark_centroid(crop, eye) - eye) < 4.0, name
    from keras_insightface.data import pipeline as data

    bins, issame = data.load_bin(bin_path)
    assert len(bins) == 8 and sorted(issame.tolist()) == [False, False, True, True]

    class NoDetector:
        def detect_batch(self, images):
            raise AssertionError("a finished folder must not be detected again")

    summary = prepare_data.align_folder(raw_folder, out, detector=NoDetector())
    assert summary["ok"] == 5 and summary["several_faces"] == 1 and summary["unreadable"] == 1
    with pytest.raises(ValueError, match="was aligned with"):
        prepare_data.align_folder(raw_folder, out, image_size=(96, 96), detector=NoDetector())


def test_interrupted_align_resumes_without_redoing_or_losing(raw_folder, detector, tmp_path):
    out = str(tmp_path / "aligned")

    class StopAfterFirstChunk:
        calls = 0

        def detect_batch(self, images):
            self.calls += 1
            if self.calls > 2:  # the first chunk is journaled while the second is detected
                raise KeyboardInterrupt
            return detector.detect_batch(images)

    with pytest.raises(KeyboardInterrupt):
        prepare_data.align_folder(raw_folder, out, detector=StopAfterFirstChunk(), chunk_size=4)
    journal = os.path.join(out, prepare_data.ALIGN_JOURNAL)
    done_first = prepare_data.read_align_journal(journal)
    assert 0 < len(done_first) < 9
    with open(journal, "a") as ff:
        ff.write("anna/plain.png,ok,1")  # a row cut short by a kill: dropped, that photo is done again
    assert not any(name.endswith(".tmp") for _, _, files in os.walk(out) for name in files)

    class Counting:
        seen = 0

        def detect_batch(self, images):
            self.seen += len(images)
            return detector.detect_batch(images)

    counting = Counting()
    summary = prepare_data.align_folder(raw_folder, out, detector=counting, chunk_size=4)
    rows = prepare_data.read_align_journal(journal)
    assert sorted(row["image"] for row in rows) == sorted({row["image"] for row in rows})  # each photo once
    assert len(rows) == summary["images"] == 9
    readable_done = sum(row["status"] != "unreadable" for row in done_first)
    assert counting.seen == 8 - readable_done  # 8 readable photos, those done before are not detected again
    assert summary["ok"] == 5 and summary["no_face"] == 2


@pytest.mark.slow  # starts a subprocess
def test_align_cli_errors_are_one_line(raw_folder, tmp_path, capsys):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prepare_data.py")
    missing = subprocess.run(
        [sys.executable, script, "--align", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip().count("\n") == 0 and f"photo folder not found: {tmp_path / 'nowhere'}" in missing.stderr
    )
    with pytest.raises(SystemExit):
        prepare_cli.main(["--align", raw_folder])  # no -o
    assert "need -o" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must not be inside the photo folder"):
        prepare_data.align_folder(raw_folder, os.path.join(raw_folder, "aligned"))
    assert not os.path.exists(os.path.join(raw_folder, "aligned"))


def test_align_checks_the_bin_pairs_before_aligning(raw_folder, tmp_path):
    out = str(tmp_path / "aligned")
    with pytest.raises(ValueError, match=r"1000 pairs need 500 genuine and 500 impostor pairs, its 9 images"):
        prepare_cli.main(["--align", raw_folder, "-o", out, "--bin", str(tmp_path / "x.bin"), "--pairs", "1000"])
    assert not os.path.exists(out)  # nothing aligned, nothing written


def test_images_smaller_than_a_face_never_reach_the_detector(detector, monkeypatch):
    calls = []
    run = detector._run
    monkeypatch.setattr(detector, "_run", lambda images: calls.append(len(images)) or run(images))
    tiny = [np.full((size, 30, 3), 128, np.uint8) for size in (1, 12, 19)]
    assert detector.detect_batch(tiny) == [[], [], []] and calls == []
    assert detector.detect_batch(tiny + [skimage.data.astronaut()])[3] and calls == [1]
