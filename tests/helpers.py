"""Helpers shared by tests and the subprocess jobs they start (plain functions: the jobs cannot use fixtures)."""

import io
import os
import socket
import struct
import subprocess

import keras
import matplotlib.image
import numpy as np


def tiny_basic_model(input_shape=(32, 32, 3), emb=32):
    """A small conv net ending in a layer named ``embedding``: fast enough for tests."""
    inputs = keras.Input(input_shape)
    nn = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    nn = keras.layers.BatchNormalization(momentum=0.9)(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(momentum=0.9)(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    nn = keras.layers.Dense(emb, use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(momentum=0.9, name="embedding")(nn)
    return keras.Model(inputs, nn, name="tiny")


# ---------------------------------------------------------------------------------------------- backend-neutral
def on_tensorflow():
    """True when the tests run on Keras' TensorFlow backend (``KERAS_BACKEND`` unset or ``tensorflow``)."""
    return keras.backend.backend() == "tensorflow"


def value_and_gradients(fn, *args, variables=()):
    """``(value, [d value / d arg for each arg] + [d value / d var for each of variables])`` as numpy arrays.

    ``fn(*args)`` must return a scalar. TensorFlow: a ``tf.GradientTape`` watching the args (a sparse
    ``IndexedSlices`` gradient is densified). JAX: ``jax.value_and_grad`` of a pure function of the args and the
    variables' values, ``fn`` running in a ``keras.StatelessScope`` that maps ``variables`` to those values; any
    state a loss assigns inside ``fn`` is discarded there.
    """
    if on_tensorflow():
        import tensorflow as tf

        args = [tf.convert_to_tensor(arg) for arg in args]
        with tf.GradientTape() as tape:
            tape.watch(args)
            value = fn(*args)
        gradients = tape.gradient(value, [*args, *variables])
        return np.asarray(value), [np.asarray(tf.convert_to_tensor(grad)) for grad in gradients]
    import jax

    def pure(arg_values, variable_values):
        with keras.StatelessScope(state_mapping=list(zip(variables, variable_values))):
            return fn(*arg_values)

    args = [keras.ops.convert_to_tensor(arg) for arg in args]
    value, (arg_grads, var_grads) = jax.value_and_grad(pure, argnums=(0, 1))(args, [var.value for var in variables])
    return np.asarray(value), [np.asarray(grad) for grad in [*arg_grads, *var_grads]]


def compiled(fn, state=(), jit_compile=True):
    """``fn`` compiled as a training step compiles it. TensorFlow: ``tf.function(fn, jit_compile=jit_compile)``
    (XLA or a plain graph). JAX: ``jax.jit`` (always XLA) of a pure function that runs ``fn`` in a
    ``keras.StatelessScope`` mapping the ``state`` variables (a loss's state) to their values and returns the values
    the call assigned; they are written back after each call, so consecutive calls see the updated state as eager
    calls do."""
    if on_tensorflow():
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile)
    import jax

    def pure(state_values, *args):
        with keras.StatelessScope(state_mapping=list(zip(state, state_values))) as scope:
            value = fn(*args)
        return value, [scope.get_current_value(variable) for variable in state]

    jitted = jax.jit(pure)

    def call(*args):
        value, new_values = jitted([variable.value for variable in state], *args)
        for variable, new_value in zip(state, new_values):
            variable.assign(new_value)
        return value

    return call


# ---------------------------------------------------------------------------------------------- numpy references
def np_softmax(logits):
    return np.exp(np_log_softmax(logits))


def np_log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_cross_entropy(labels, logits, label_smoothing=0.0):
    """Keras categorical cross entropy from logits, one-hot smoothed as ``y * (1 - ls) + ls / C``."""
    onehot = np.eye(logits.shape[-1])[labels]
    onehot = onehot * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    return -(onehot * np_log_softmax(logits)).sum(axis=-1)


def np_with_target(cosines, labels, target):
    out = cosines.astype("float64").copy()
    out[np.arange(len(labels)), labels] = target
    return out


def np_arcface(cosines, labels, m1, m2, m3, scale, ls=0.0):
    """Combined margin: cos(m1*acos(c) + m2) - m3, mirrored to (-1-m3)*2 - t at c <= cos((pi-m2)/m1)."""
    cos_y = cosines[np.arange(len(labels)), labels].astype("float64")
    target = np.cos(m1 * np.arccos(cos_y) + m2) - m3
    target = np.where(cos_y > np.cos((np.pi - m2) / m1), target, (-1 - m3) * 2 - target)
    return np_cross_entropy(labels, np_with_target(cosines, labels, target) * scale, ls)


# ---------------------------------------------------------------------------------------------- RecordIO test data
# Written here from the published layout, independently of the library's writer: a frame is uint32 magic 0xced7230a,
# uint32 lrec (cflag << 29 | length), the payload padded to 4; a payload splits at every 4-aligned magic word into
# cflag 1 / 2 / 3 parts (the word dropped). A payload is struct '<IfQQ' (flag, label, id, id2), `flag` float32 labels
# when flag > 0, then the image. Record 0 of an insightface set holds labels [first identity record, end]; identity
# record first + c holds the image-key range [start, stop) of class c.
RECORDIO_MAGIC = 0xCED7230A
MAGIC_WORD = struct.pack("<I", RECORDIO_MAGIC)
TAG_STEP = 10  # a tagged image is flat: red 10 * (tag % 25) + 5, green 10 * (tag // 25) + 5


def tagged_image(tag, size=8, image_format="PNG", comment=None):
    """Encoded flat image whose colour says ``tag``; a JPEG ``comment`` goes in a COM segment right after SOI."""
    from PIL import Image

    pixel = (TAG_STEP * (tag % 25) + 5, TAG_STEP * (tag // 25) + 5, 128)
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), pixel, np.uint8)).save(buffer, format=image_format, quality=95)
    encoded = buffer.getvalue()
    if comment is not None:
        encoded = encoded[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + encoded[2:]
    return encoded


def tags_of(images, scale=0.0078125):
    """Tags of a batch of normalized images ``(x - 127.5) * scale`` (first pixel)."""
    pixels = np.asarray(images)[:, 0, 0, :2] / scale + 127.5
    red, green = (np.rint((pixels[:, ii] - 5) / TAG_STEP).astype(int) for ii in (0, 1))
    return (red + 25 * green).tolist()


def epoch_tags(tt, local_images, epochs=2):
    """Tags of the images this process receives in each of ``epochs`` epochs of ``tt``'s training data, through its
    runner's distributed input; ``local_images(batch)`` gives the numpy arrays of a batch held here."""
    make_worker_dataset = lambda batch_size, shard: tt._dataset(0, batch_size, shard).dataset  # noqa: E731
    iterator = iter(tt.runner.distribute(tt.train_ds.dataset, tt.global_batch_size, make_worker_dataset))
    seen = []
    for _ in range(epochs):
        seen.append([])
        for _ in range(tt.steps_per_epoch):
            images, _ = next(iterator)
            for local in local_images(images):
                seen[-1] += tags_of(local)
    return seen


def record_frames(payload):
    """The framed bytes of one record payload (split at 4-aligned magic words, cflag 1/2/3)."""
    cuts = [pos for pos in range(0, len(payload) - 3, 4) if payload[pos : pos + 4] == MAGIC_WORD]
    parts = [payload[start:end] for start, end in zip([0] + [cut + 4 for cut in cuts], cuts + [len(payload)])]
    flags = [0] if len(parts) == 1 else [1] + [2] * (len(parts) - 2) + [3]
    return b"".join(
        struct.pack("<II", RECORDIO_MAGIC, (flag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)
        for flag, part in zip(flags, parts)
    )


def image_payload(label, image, extra_labels=()):
    """A record payload: the '<IfQQ' header (flag = number of float labels; 0 for a scalar label), labels, image."""
    if not extra_labels:
        return struct.pack("<IfQQ", 0, float(label), 0, 0) + image
    labels = [float(label), *extra_labels]
    return struct.pack("<IfQQ", len(labels), 0.0, 0, 0) + struct.pack(f"<{len(labels)}f", *labels) + image


# After the 24-byte header, two float labels (8 bytes) and the JPEG's SOI + COM header (6 bytes), b"\0\0" puts the
# first magic word at payload offset 40 and the next at 48: both 4-aligned, so the record is written in three parts.
SPLIT_COMMENT = b"\0\0" + MAGIC_WORD + b"abcd" + MAGIC_WORD


def tagged_rec_image(tag):
    """The image bytes :func:`write_tagged_rec` stores for ``tag``."""
    return tagged_image(tag, image_format="JPEG", comment=SPLIT_COMMENT) if tag == 1 else tagged_image(tag)


def write_tagged_rec(folder, class_sizes, identity_header=True, overrides=None):
    """``folder/train.rec`` + ``train.idx``: image ``tag`` (0, 1, ...) is record ``tag + 1`` (with the identity
    header) or ``tag``, class-major; two images in three (tags 0, 1, 3, 4 ...) have a 2-label header ``[class, 0.5]``
    (so without the identity header, record 0 is an image with two labels, not a header); image 1 is a JPEG
    whose payload splits into three frames. ``overrides`` maps a tag to the image bytes to store instead.
    Returns the class of each tag."""
    os.makedirs(folder, exist_ok=True)
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    overrides = overrides or {}
    payloads = []
    for tag, label in enumerate(labels.tolist()):
        image = overrides.get(tag, tagged_rec_image(tag))
        payloads.append(image_payload(label, image, (0.5,) if tag % 3 != 2 else ()))
    if identity_header:
        first = len(labels) + 1
        stops = np.cumsum(class_sizes) + 1
        ranges = [image_payload(stop - size, b"", (stop,)) for size, stop in zip(class_sizes, stops)]
        payloads = [image_payload(first, b"", (first + len(class_sizes),))] + payloads + ranges
    rec, idx = b"", []
    for key, payload in enumerate(payloads):
        idx.append(f"{key}\t{len(rec)}\n")
        rec += record_frames(payload)
    with open(os.path.join(folder, "train.rec"), "wb") as ff:
        ff.write(rec)
    with open(os.path.join(folder, "train.idx"), "w") as ff:
        ff.writelines(idx)
    return labels


# ---------------------------------------------------------------------------------------------- distributed jobs
def free_ports(count):
    """``count`` free TCP ports on the loopback interface, below the ephemeral range: the ports the system gives
    outgoing connections (of any process) are taken from that range, so a port below it that is free now stays free
    for the job to bind. Under pytest-xdist each test process takes only ports of its own residue class
    (port % processes == its index), so two processes never pick the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index, processes = int(worker[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    ports, rng = [], np.random.default_rng()
    while len(ports) < count:
        port = int(rng.integers(20000, 32000)) // processes * processes + index
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def run_together(commands, env, timeout, status=0):
    """Start the processes of one distributed job at once and wait for all: their stdouts, in order. A process that
    ends with another exit status than ``status`` fails the test with the end of its stderr; none outlives the
    call."""
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == status, stderr[-3000:]
            outputs.append(stdout)
    finally:
        for proc in procs:
            proc.kill()
    return outputs


# ---------------------------------------------------------------------------------------------- pictures
def read_png(path):
    """RGB float array of a PNG file."""
    return matplotlib.image.imread(path)[..., :3]


def assert_drawn_png(path, min_kb=20):
    """The PNG exists, has a sensible size and holds many colours (curves, text), not a blank canvas."""
    assert os.path.getsize(path) > min_kb * 1024
    image = read_png(path)
    height, width = image.shape[:2]
    assert 600 < height < 4000 and 800 < width < 6000
    rgb = (image * 255).round().astype(np.int64).reshape(-1, 3)
    colours = np.unique(rgb[:, 0] * 65536 + rgb[:, 1] * 256 + rgb[:, 2])
    assert len(colours) > 50
    non_white = np.any(image < 0.95, axis=-1).mean()
    assert 0.01 < non_white < 0.6
    return image
