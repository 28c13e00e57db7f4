"""Data: file formats, MXNet RecordIO, TFRecord shards, the ``tf.data`` training pipeline, augmentation and the demo dataset."""
