"""Face alignment: the ArcFace 5-point template and the similarity warp that puts detected landmarks on it.

The one place that knows the template. Training crops (``prepare_data.py --align``), IJB images and photos to
compare are all warped here, so a model sees faces aligned the same way everywhere.
"""

import numpy as np

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)  # (x, y) of left eye, right eye, nose tip, left and right mouth corners in a 112x112 crop


def alignment_template(image_size=(112, 112)):
    """The ArcFace 5-point template for a crop of ``image_size`` = (height, width).

    Scaled uniformly with the height and centred horizontally, so faces keep their proportions in any crop shape
    (a similarity transform cannot follow a stretched template): 112x96 gives the classic 96-pixel-wide crop, the
    112x112 template moved 8 pixels left.
    """
    height, width = image_size
    scale = height / 112.0
    return ARCFACE_TEMPLATE * np.float32(scale) + np.array([(width - 112.0 * scale) / 2, 0.0], dtype=np.float32)


def estimate_alignment(landmarks, image_size=(112, 112)):
    """Similarity transform (skimage) mapping 5 detected landmarks (x, y) onto the ArcFace template."""
    from skimage.transform import SimilarityTransform

    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected 5 (x, y) landmarks, got shape {np.shape(landmarks)}")
    transform = SimilarityTransform.from_estimate(landmarks, alignment_template(image_size).astype(np.float64))
    if not transform:
        raise ValueError(f"cannot estimate an alignment from landmarks {landmarks.tolist()}: {transform}")
    return transform


def face_align_landmarks(image, landmarks, image_size=(112, 112)):
    """Crop a face: warp ``image`` (HxWx3) so its 5 landmarks land on the ArcFace template; zero border.

    ``landmarks`` is (5, 2) or 10 values (x1, y1, ..., x5, y5). Uses OpenCV's ``warpAffine`` when installed
    (faster), else skimage ``warp``; both bilinear. Returns an array of ``image``'s dtype, ``image_size`` big.
    """
    image = np.asarray(image)
    matrix = estimate_alignment(landmarks, image_size).params
    height, width = image_size
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        return cv2.warpAffine(image, matrix[:2], (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    from skimage.transform import AffineTransform, warp

    warped = warp(
        image,
        AffineTransform(matrix=matrix).inverse,
        output_shape=(height, width),
        order=1,
        mode="constant",
        cval=0,
        preserve_range=True,
    )
    if np.issubdtype(image.dtype, np.integer):
        warped = np.clip(np.round(warped), np.iinfo(image.dtype).min, np.iinfo(image.dtype).max)
    return warped.astype(image.dtype)
