"""Helper for test_run_safety: the first epoch of a 2-epoch run (center loss, an evaluation bin, the history plot),
then the second, which SIGKILLs the process at its ``--kill``-th file replacement (``os.replace``, the commit of
every atomic write), just ``--when`` before or after it. Prints ``REPLACE <name>`` for each replacement of the
second epoch end; without ``--kill`` (or with a number past the last one) the run completes."""

import argparse
import os
import signal

import keras
from helpers import tiny_basic_model

from keras_insightface.nn import losses
from keras_insightface.training import train

real_replace = os.replace


def kill_at_replacement(number, when):
    """Patch ``os.replace`` so that the ``number``-th call from now on SIGKILLs the process ``when`` it happens."""
    count = 0

    def replace(source, target, *args, **kwargs):
        nonlocal count
        count += 1
        print(f"REPLACE {os.path.basename(target)}", flush=True)
        if count == number and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target, *args, **kwargs)
        if count == number and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


class ArmAtSecondEpoch(keras.callbacks.Callback):
    """Arms the kill at the second epoch; its evaluation always counts as the best so far, so that every run makes
    the same writes (the best basic model is saved only when the accuracy improves)."""

    def __init__(self, trainer, number, when):
        super().__init__()
        self.trainer, self.number, self.when = trainer, number, when

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.trainer.evaluators[0].max_accuracy = -1.0
            kill_at_replacement(self.number, self.when)


def make_trainer(data_path, bin_path, save_path):
    return train.Train(
        data_path, save_path, [bin_path], basic_model=tiny_basic_model(), batch_size=16, lr_base=0.01, verbose=0
    )


SCHEDULE = [{"loss": losses.ArcfaceLoss(scale=16), "centerloss": 0.01, "optimizer": "adam", "epoch": 2}]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("bin")
    parser.add_argument("save_path")
    parser.add_argument("--kill", type=int, default=0)
    parser.add_argument("--when", choices=("before", "after"), default="before")
    args = parser.parse_args()
    tt = make_trainer(args.data, args.bin, args.save_path)
    if args.kill:
        tt.custom_callbacks.append(ArmAtSecondEpoch(tt, args.kill, args.when))
    tt.train([dict(stage) for stage in SCHEDULE], 0)
    print("COMPLETED", int(tt.optimizer.iterations.numpy()), flush=True)


if __name__ == "__main__":
    main()
