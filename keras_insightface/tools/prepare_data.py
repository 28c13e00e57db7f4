"""Dataset preparation: MXNet RecordIO <-> class folders (pure Python), old-format ``.bin`` re-encoding,
verification ``.bin`` from a class folder, raw photos -> aligned face crops (``--align``, face detection with
``face_detector``), the synthetic demo dataset, TFRecord shards of a record file or class folder (``--to-shards``)
and a lost ``.idx`` rebuilt (``--rebuild_idx``). The RecordIO format itself lives in ``recordio``.
"""

import io
import os
import warnings
from collections import Counter, namedtuple

import numpy as np

from keras_insightface.data.recordio import (  # noqa: F401 (the RecordIO names older scripts import from prepare_data)
    IR_FORMAT,
    IR_SIZE,
    LENGTH_MASK,
    MAGIC_BYTES,
    RECORDIO_MAGIC,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    frame_record,
    identity_header_range,
    pack_record,
    read_idx,
    record_class,
    unpack_record,
    write_recordio,
)
from keras_insightface.utils import atomic_write, save_bytes


# ---------------------------------------------------------------------------------------------------------
# Class folders <-> RecordIO.
# ---------------------------------------------------------------------------------------------------------
def _image_size(image_bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as image:
        return image.size[1], image.size[0]


def pack_folder(folder, dest_dir, extra_labels=None):
    """Pack ``folder/<class>/<image>`` into ``dest_dir/train.rec``, ``train.idx`` and ``property`` (insightface layout).

    Record 0 holds label ``[N + 1, N + 1 + num_classes]``; images are records ``1..N`` with the class index as
    label; records ``N + 1 ..`` hold each identity's image range ``[start, end)``. ``extra_labels`` maps
    ``"<class>/<image>"`` to extra float labels written after the class (a multi-label header).
    """
    from keras_insightface.data.pipeline import scan_class_folder

    image_names, image_classes, class_names = scan_class_folder(folder)
    extra_labels = extra_labels or {}
    first_identity = len(image_names) + 1

    def records():
        yield 0, pack_record([first_identity, first_identity + len(class_names)], b"")
        for key, (path, label) in enumerate(zip(image_names, image_classes), start=1):
            with open(path, "rb") as ff:
                payload = ff.read()
            extra = extra_labels.get(f"{class_names[label]}/{os.path.basename(path)}")
            yield key, pack_record(label if extra is None else [label, *extra], payload, record_id=key)
        counts = np.bincount(image_classes, minlength=len(class_names))
        for label, (count, end) in enumerate(zip(counts, np.cumsum(counts) + 1)):
            yield first_identity + label, pack_record([end - count, end], b"")

    rec_path, idx_path = os.path.join(dest_dir, "train.rec"), os.path.join(dest_dir, "train.idx")
    write_recordio(rec_path, idx_path, records())
    with open(image_names[0], "rb") as ff:
        height, width = _image_size(ff.read())
    property_path = os.path.join(dest_dir, "property")
    save_bytes(property_path, f"{len(class_names)},{height},{width}\n".encode())
    return {
        "rec": rec_path,
        "idx": idx_path,
        "property": property_path,
        "images": len(image_names),
        "classes": len(class_names),
    }


def _existing_outputs(dest_dir):
    """``{record key: path}`` of images already extracted to ``dest_dir/<label>/<key>.jpg``."""
    done = {}
    if not os.path.isdir(dest_dir):
        return done
    for class_entry in os.scandir(dest_dir):
        if class_entry.is_dir():
            for entry in os.scandir(class_entry.path):
                stem, ext = os.path.splitext(entry.name)
                if ext == ".jpg" and stem.isdigit():
                    done[int(stem)] = entry.path
    return done


def image_keys_from_header(reader):
    """``(image record keys, announced image count)``: ``1 .. label[0] - 1`` and ``label[0] - 1`` when record 0 is
    an insightface header, else every indexed key and ``None``."""
    bounds = identity_header_range(reader.read(0)) if 0 in reader.index else None
    if bounds:
        return list(range(1, bounds[0])), bounds[0] - 1
    return sorted(reader.index), None


def recordio_to_folders(data_dir, dest_dir=None, limit=0):
    """Extract ``data_dir/train.rec`` + ``train.idx`` to ``<data_dir>_112x112_folders/<label>/<key>.jpg``.

    Resumable: images already on disk are skipped and every file is written atomically. Returns a summary dict;
    ``mismatch`` is True (with a warning) when the extracted count differs from what record 0 announces.
    """
    from tqdm import tqdm

    data_dir = os.path.normpath(data_dir)
    dest_dir = dest_dir or data_dir + "_112x112_folders"
    rec_path, idx_path = os.path.join(data_dir, "train.rec"), os.path.join(data_dir, "train.idx")
    with RecordIOReader(rec_path, idx_path) as reader:
        keys, expected = image_keys_from_header(reader)
        present = [key for key in keys if key in reader.index]
        if limit > 0:
            present = present[:limit]
        done = _existing_outputs(dest_dir)
        todo = [key for key in present if key not in done]
        for key in tqdm(todo, desc="Extracting", initial=len(present) - len(todo), total=len(present)):
            header, image = unpack_record(reader.read(key))
            save_bytes(os.path.join(dest_dir, str(record_class(header)), f"{key}.jpg"), image)
    present_set = set(present)
    extracted = sum(1 for key in _existing_outputs(dest_dir) if key in present_set)
    summary = {
        "dest_dir": dest_dir,
        "expected": expected,
        "indexed": len(present),
        "extracted": extracted,
        "new": len(todo),
    }
    summary["mismatch"] = limit <= 0 and expected is not None and extracted != expected
    if summary["mismatch"]:
        warnings.warn(
            f"{rec_path}: record 0 announces {expected} images but {extracted} were extracted "
            f"({len(present)} image records in the index)",
            stacklevel=2,
        )
    return summary


# ---------------------------------------------------------------------------------------------------------
# Verification .bin files.
# ---------------------------------------------------------------------------------------------------------
def reformat_bin(path, dest_path=None):
    """Re-encode a ``.bin`` whose images are numpy uint8 arrays to plain byte strings, into a NEW file.

    The original stays untouched; the default destination is ``<stem>_reformatted.bin`` next to it. An existing
    destination is kept (re-running skips done work).
    """
    from keras_insightface.data.pipeline import load_bin, write_bin

    dest_path = dest_path or os.path.splitext(path)[0] + "_reformatted.bin"
    if os.path.abspath(dest_path) == os.path.abspath(path):
        raise ValueError(f"refusing to overwrite the original bin {path}; choose another destination")
    if os.path.exists(dest_path):
        return dest_path  # written atomically, so an existing file is complete
    bins, issame = load_bin(path)
    return write_bin(dest_path, bins, issame)


def _sample_unique_pairs(draw, count, rng, what):
    """Draw ``count`` distinct unordered pairs with ``draw(rng)``; fail clearly when too few distinct ones exist."""
    pairs = set()
    for _ in range(count * 50 + 100):
        if len(pairs) == count:
            break
        aa, bb = draw(rng)
        pairs.add((min(aa, bb), max(aa, bb)))
    if len(pairs) < count:
        raise ValueError(f"could only find {len(pairs)} distinct {what} pairs, {count} requested: use fewer --pairs")
    return sorted(pairs)


def check_pair_counts(labels, num_pairs, where):
    """Fail before any work when images of the classes ``labels`` cannot give ``num_pairs`` distinct pairs, half
    genuine (same class) and half impostor."""
    sizes = np.bincount(np.asarray(labels, np.int64))
    genuine = int((sizes * (sizes - 1) // 2).sum())
    impostor = len(labels) * (len(labels) - 1) // 2 - genuine
    need_genuine, need_impostor = num_pairs // 2, num_pairs - num_pairs // 2
    if need_genuine < 1 or genuine < need_genuine or impostor < need_impostor:
        raise ValueError(
            f"{where}: {num_pairs} pairs need {need_genuine} genuine and {need_impostor} impostor pairs, its "
            f"{len(labels)} images of {np.count_nonzero(sizes)} identities allow {genuine} and {impostor}: "
            "use fewer --pairs (at least 2) or more images"
        )


def check_pairs_of_photos(raw_dir, num_pairs):
    """Before aligning ``raw_dir`` for a ``.bin``: its photos, one crop each at most, can give ``num_pairs`` pairs."""
    from keras_insightface.data.pipeline import scan_class_folder

    check_pair_counts(scan_class_folder(raw_dir, what="photo folder")[1], num_pairs, raw_dir)


def make_bin_from_folder(folder, dest_path, num_pairs=3000, seed=0):
    """Build a verification ``.bin`` from ``folder/<class>/<image>``: ``num_pairs // 2`` genuine (same class) and
    the rest impostor pairs, distinct and in shuffled order; image bytes are copied from the files unchanged.
    """
    from keras_insightface.data.pipeline import scan_class_folder, write_bin

    paths, labels, class_names = scan_class_folder(folder)
    check_pair_counts(labels, num_pairs, folder)
    by_class = [np.flatnonzero(labels == label) for label in range(len(class_names))]
    multi = [members for members in by_class if len(members) >= 2]
    num_genuine = num_pairs // 2
    rng = np.random.default_rng(seed)

    def draw_genuine(rng):
        return tuple(rng.choice(multi[rng.integers(len(multi))], 2, replace=False))

    def draw_impostor(rng):
        aa, bb = rng.choice(len(by_class), 2, replace=False)
        return rng.choice(by_class[aa]), rng.choice(by_class[bb])

    genuine = _sample_unique_pairs(draw_genuine, num_genuine, rng, "genuine")
    impostor = _sample_unique_pairs(draw_impostor, num_pairs - num_genuine, rng, "impostor")
    pairs = [(aa, bb, True) for aa, bb in genuine] + [(aa, bb, False) for aa, bb in impostor]
    pairs = [pairs[ii] for ii in rng.permutation(len(pairs))]
    cache = {}

    def read(index):
        if index not in cache:
            with open(paths[index], "rb") as ff:
                cache[index] = ff.read()
        return cache[index]

    bins = [read(index) for aa, bb, _ in pairs for index in (aa, bb)]
    return write_bin(dest_path, bins, [same for _, _, same in pairs])


# ---------------------------------------------------------------------------------------------------------
# Raw photos -> aligned class folder (face detection + ArcFace alignment).
# ---------------------------------------------------------------------------------------------------------
ALIGN_JOURNAL = ".align_journal.csv"  # one row per finished image, appended: what a resumed run skips
ALIGN_OPTIONS = ".align_options.json"
ALIGN_REPORT = "align_report.csv"
REPORT_FIELDS = ("image", "status", "faces", "detail")


def _output_stems(rel_paths):
    """``<class>/<stem>`` of each raw image's crop; ``<class>/<stem>_<ext>`` where two files of a class share a stem."""
    stems = [os.path.splitext(rel)[0] for rel in rel_paths]
    counts = Counter(stems)
    return {
        rel: stem if counts[stem] == 1 else f"{stem}_{os.path.splitext(rel)[1][1:]}"
        for rel, stem in zip(rel_paths, stems)
    }


def _check_align_options(out_dir, options):
    """Record the options of an output folder; refuse to resume it with different ones (crops would not match)."""
    from keras_insightface.utils import load_json, save_json

    path = os.path.join(out_dir, ALIGN_OPTIONS)
    previous = load_json(path)
    if previous is not None and previous != options:
        raise ValueError(f"{out_dir} was aligned with {previous}, not {options}: use another output folder")
    if previous is None:
        save_json(path, options)


def read_align_journal(path):
    """Rows (dicts of ``REPORT_FIELDS``) of an alignment journal. A last line cut short by a kill is removed from
    the file, so its image is simply done again."""
    import csv

    if not os.path.exists(path):
        return []
    with open(path, "rb+") as ff:
        content = ff.read()
        complete = content[: content.rfind(b"\n") + 1]
        if len(complete) != len(content):
            ff.truncate(len(complete))
    return list(csv.DictReader(io.StringIO(complete.decode("utf-8")), fieldnames=REPORT_FIELDS))


def _decode(raw_dir, rel):
    """(rel, image or None, detail): a failed decode becomes an ``unreadable`` row instead of an exception."""
    from keras_insightface.faces.detector import load_image

    try:
        return rel, load_image(os.path.join(raw_dir, rel), name=rel), ""
    except OSError as err:  # UnreadableImageError is a ValueError; a vanished file is an OSError
        return rel, None, f"{type(err).__name__}: {err}"
    except ValueError as err:
        return rel, None, str(err)


def _write_crops(rel, image, faces, out_stem, options):
    """Select, align and save (atomically) the crops of one image; returns its journal row."""
    from keras_insightface.data.pipeline import encode_jpeg
    from keras_insightface.faces.detector import align_faces, select_faces

    height, width = image.shape[:2]
    if not faces:
        return rel, "no_face", 0, f"no face found in {width}x{height} image"
    kept = select_faces(faces, image.shape, options["keep"])
    crops = align_faces(image, kept, tuple(options["image_size"]))
    for index, crop in enumerate(crops):
        suffix = f"_{index}" if options["keep"] == "all" else ""
        save_bytes(out_stem + suffix + ".jpg", encode_jpeg(crop))
    if len(faces) == 1:
        return rel, "ok", 1, ""
    scores = ", ".join(f"{face.score:.3f}" for face in faces)
    return (
        rel,
        "several_faces",
        len(faces),
        f"{len(faces)} faces (scores {scores}); kept {len(kept)} ({options['keep']})",
    )


AlignJob = namedtuple("AlignJob", ["raw_dir", "out_dir", "stems", "options", "detector"])


def _align_chunk(pool, decoded, job):
    """Detect the faces of one chunk of decoded images (batched, in this thread), then hand cropping and saving
    to ``pool``. Returns the futures of the chunk's journal rows, in order."""
    readable = [(rel, image) for rel, image, _ in decoded if image is not None]
    faces_of = dict(zip((rel for rel, _ in readable), job.detector.detect_batch([image for _, image in readable])))
    futures = []
    for rel, image, detail in decoded:
        if image is None:
            futures.append(pool.submit(tuple, (rel, "unreadable", 0, detail)))
        else:
            out_stem = os.path.join(job.out_dir, job.stems[rel])
            futures.append(pool.submit(_write_crops, rel, image, faces_of[rel], out_stem, job.options))
    return futures


def align_folder(raw_dir, out_dir, image_size=(112, 112), keep="largest", workers=None, detector=None, chunk_size=64):
    """Detect, align and save the faces of ``raw_dir/<class>/<photo>`` into ``out_dir/<class>/<stem>.jpg``.

    ``keep``: ``"largest"`` or ``"central"`` face (one crop per photo) or ``"all"`` (``<stem>_<k>.jpg``, largest
    first). The detector runs in this thread on batches of equal-sized photos (TensorFlow spreads it over the
    cores) while ``workers`` threads decode the next chunk and warp, encode and save the previous one.
    Resumable: each finished photo is appended to a journal and skipped by the next run; crops are written
    atomically. Photos without a face, with several faces or unreadable are listed in ``out_dir/align_report.csv``.
    Returns a summary dict with the count of each status.
    """
    from concurrent.futures import ThreadPoolExecutor

    from keras_insightface.data.pipeline import scan_class_folder

    if keep not in ("largest", "central", "all"):
        raise ValueError(f"keep must be largest, central or all, got {keep!r}")
    raw_root, out_root = os.path.realpath(raw_dir), os.path.realpath(out_dir)
    if os.path.commonpath([raw_root, out_root]) == raw_root:
        raise ValueError(f"the output folder {out_dir} must not be inside the photo folder {raw_dir}")
    paths, _, _ = scan_class_folder(raw_dir, what="photo folder")
    rel_paths = [os.path.relpath(path, raw_dir) for path in paths]
    options = {"image_size": [int(size) for size in image_size], "keep": keep, "detector": "mtcnn"}
    _check_align_options(out_dir, options)
    journal_path = os.path.join(out_dir, ALIGN_JOURNAL)
    done = {row["image"] for row in read_align_journal(journal_path)}
    todo = [rel for rel in rel_paths if rel not in done]
    if todo and detector is None:
        from keras_insightface.faces.detector import FaceDetector

        detector = FaceDetector()
    job = AlignJob(raw_dir, out_dir, _output_stems(rel_paths), options, detector)
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        _run_align_chunks(pool, job, todo, len(rel_paths), chunk_size)
    return _write_align_report(out_dir, rel_paths, journal_path)


def _run_align_chunks(pool, job, todo, total, chunk_size):
    """The alignment pipeline: decode chunk k+1 and save chunk k-1 in ``pool`` while chunk k is detected; each
    saved photo's row is then appended to the journal and flushed (a kill loses at most two chunks of work)."""
    import csv

    from tqdm import tqdm

    chunks = [todo[start : start + chunk_size] for start in range(0, len(todo), chunk_size)]
    decoding = [pool.submit(_decode, job.raw_dir, rel) for rel in chunks[0]] if chunks else []
    saving = []
    journal_path = os.path.join(job.out_dir, ALIGN_JOURNAL)
    with (
        open(journal_path, "a", newline="", encoding="utf-8") as journal,
        tqdm(total=total, desc="Aligning", unit="img") as progress,
    ):
        writer = csv.writer(journal, lineterminator="\n")
        progress.update(total - len(todo))
        for index in range(len(chunks) + 1):
            decoded = [future.result() for future in decoding]
            following = chunks[index + 1] if index + 1 < len(chunks) else []
            decoding = [pool.submit(_decode, job.raw_dir, rel) for rel in following]
            detected = _align_chunk(pool, decoded, job) if decoded else []
            for future in saving:
                writer.writerow(future.result())
                journal.flush()
                progress.update()
            saving = detected


def _write_align_report(out_dir, rel_paths, journal_path):
    """Write ``align_report.csv`` (atomically) with every photo that is not a clean single face; return counts."""
    import csv

    wanted = set(rel_paths)
    rows = {row["image"]: row for row in read_align_journal(journal_path) if row["image"] in wanted}
    counts = Counter(row["status"] for row in rows.values())
    report_path = os.path.join(out_dir, ALIGN_REPORT)
    with atomic_write(report_path) as tmp_path, open(tmp_path, "w", newline="", encoding="utf-8") as ff:
        writer = csv.DictWriter(ff, fieldnames=REPORT_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[rel] for rel in sorted(rows) if rows[rel]["status"] != "ok")
    summary = {"out_dir": out_dir, "images": len(rel_paths), "report": report_path}
    summary.update({status: counts.get(status, 0) for status in ("ok", "several_faces", "no_face", "unreadable")})
    return summary
