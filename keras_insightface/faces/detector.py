"""Find faces and their 5 landmarks in ordinary photos, and read photos the way people actually store them.

Detection uses MTCNN from the ``mtcnn`` package (MIT licence): its weights ship inside the wheel, so nothing is
downloaded at run time, and it runs on TensorFlow 2 / Keras 3. Its 5 landmarks are the points the ArcFace
alignment template was made for (eye centres, nose tip, mouth corners), so ``alignment.face_align_landmarks``
turns a detection straight into a training or evaluation crop.

``load_image`` turns any file Pillow can read into an upright uint8 RGB array: EXIF orientation is applied,
grayscale, palette, CMYK and 16-bit images are converted, and transparent pixels are composited on white.
"""

import io
import os
from dataclasses import dataclass

import numpy as np

from keras_insightface.faces.alignment import face_align_landmarks

KEEP_CHOICES = ("largest", "central", "all")
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # left = left side of the image
DETECT_MAX_SIDE = 1280  # larger photos are shrunk for detection only; crops are cut from the full image


class UnreadableImageError(ValueError):
    """A file is not an image Pillow can decode (wrong content, truncated, too large, unsupported)."""


@dataclass(frozen=True)
class Face:
    """One detection: ``box`` (x1, y1, x2, y2), detector ``score`` and ``landmarks`` (5, 2) as (x, y) pixels."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def area(self):
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


# ---------------------------------------------------------------------------------------------------------
# Reading photos.
# ---------------------------------------------------------------------------------------------------------
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes for 16-bit grayscale PNG / TIFF


def _to_rgb(image):
    """Convert a Pillow image of any mode to an uint8 RGB array (16-bit gray scaled, alpha composited on white)."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_GRAY:
        gray = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(gray / 257.0), 0, 255).astype(np.uint8) if gray.max() > 255 else gray.astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def load_image(source, name=None):
    """Decode a path or encoded bytes into an upright uint8 RGB array (H, W, 3).

    EXIF orientation is applied; the first frame of an animation is used. Raises ``UnreadableImageError``
    (a ValueError) naming the file when it cannot be decoded, also for images too large for Pillow's
    decompression-bomb limit; a missing file raises FileNotFoundError.
    """
    from PIL import Image, ImageOps

    name = name or (os.fspath(source) if isinstance(source, str | os.PathLike) else "image")
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with Image.open(stream) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{name}: cannot read image ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------------------------------------
# Detection.
# ---------------------------------------------------------------------------------------------------------
def _packaged_weights(file_name):
    """Absolute path of a weight file inside the installed ``mtcnn`` package.

    ``mtcnn`` looks for a bare weight name in the current directory first and would unpickle whatever file of
    that name it finds there; an absolute path makes it read only its own packaged file.
    """
    import importlib.resources

    return str(importlib.resources.files("mtcnn.assets.weights") / file_name)


def _build_mtcnn():
    try:
        from mtcnn import MTCNN
        from mtcnn.stages import StageONet, StagePNet, StageRNet
    except ImportError as err:
        raise ImportError(f"face detection needs the mtcnn package: pip install mtcnn ({err})") from err
    stages = [
        StagePNet(weights=_packaged_weights("pnet.lz4")),
        StageRNet(weights=_packaged_weights("rnet.lz4")),
        StageONet(weights=_packaged_weights("onet.lz4")),
    ]
    return MTCNN(stages=stages)


def _faces_from_rows(rows, scale=1.0):
    """``Face`` objects from mtcnn's numpy rows ``[index, x1, y1, x2, y2, score, 5 x, 5 y]``, in full-image pixels."""
    return [
        Face(box=row[1:5] * scale, score=float(row[5]), landmarks=np.stack([row[6:11], row[11:16]], axis=1) * scale)
        for row in rows
    ]


class FaceDetector:
    """MTCNN face + 5-landmark detector, built once and reused (building takes a few seconds).

    ``min_face_size`` (pixels of the detection image) and ``thresholds`` (PNet, RNet, ONet scores) are MTCNN's.
    Photos whose longer side exceeds ``max_side`` are shrunk for detection; coordinates are returned in the
    original image. ``batch_size`` images of equal size are detected in one call (about 4x faster per image
    than one by one on a CPU).
    """

    def __init__(self, min_face_size=20, thresholds=(0.6, 0.7, 0.8), max_side=DETECT_MAX_SIDE, batch_size=32):
        self.options = {
            "min_face_size": min_face_size,
            "threshold_pnet": thresholds[0],
            "threshold_rnet": thresholds[1],
            "threshold_onet": thresholds[2],
        }
        self.max_side, self.batch_size = max_side, batch_size
        self._mtcnn = _build_mtcnn()

    def detect(self, image):
        """Faces of one uint8 RGB image, as a list of ``Face``."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images):
        """Faces of each image of a list; images of equal size share detector calls. An image smaller than
        ``min_face_size`` cannot hold a detectable face: it gets none, without running the detector on it."""
        shrunk = [self._shrink(np.asarray(image)) for image in images]
        groups = {}
        for index, (small, _) in enumerate(shrunk):
            if min(small.shape[:2]) >= self.options["min_face_size"]:
                groups.setdefault(small.shape, []).append(index)
        results = [[] for _ in images]
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                rows = self._run([shrunk[index][0] for index in chunk])
                for position, index in enumerate(chunk):
                    results[index] = _faces_from_rows(rows[rows[:, 0] == position], shrunk[index][1])
        return results

    def _shrink(self, image):
        """(detection image, factor back to the original): shrunk when the longer side exceeds ``max_side``."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
        longer = max(image.shape[:2])
        if not self.max_side or longer <= self.max_side:
            return image, 1.0
        from PIL import Image

        factor = self.max_side / longer
        size = (max(round(image.shape[1] * factor), 1), max(round(image.shape[0] * factor), 1))
        return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), image.shape[1] / size[0]

    def _run(self, images):
        rows = self._mtcnn.detect_faces(images, output_type="numpy", box_format="xyxy", **self.options)
        return np.asarray(rows, dtype=np.float64).reshape(-1, 16)


# ---------------------------------------------------------------------------------------------------------
# Choosing faces and cutting crops.
# ---------------------------------------------------------------------------------------------------------
def select_faces(faces, image_shape, keep="largest"):
    """The faces to keep: ``"largest"`` box, the ``"central"`` one (box centre nearest the image centre) or
    ``"all"`` (largest first). Returns a list (empty when there is no face)."""
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
    if not faces:
        return []
    by_size = sorted(faces, key=lambda face: -face.area)
    if keep == "all":
        return by_size
    if keep == "largest":
        return by_size[:1]
    center = np.array([image_shape[1], image_shape[0]], dtype=np.float64) / 2
    return [min(by_size, key=lambda face: np.linalg.norm((face.box[:2] + face.box[2:]) / 2 - center))]


def align_faces(image, faces, image_size=(112, 112)):
    """Aligned uint8 crops (``image_size`` = (height, width)) of ``faces`` in ``image``, through the ArcFace template."""
    return [face_align_landmarks(image, face.landmarks, image_size) for face in faces]
