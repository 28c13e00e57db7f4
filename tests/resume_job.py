"""Helper for test_train.test_resume_after_sigkill: a 4-epoch run with center loss that may SIGKILL itself."""

import argparse
import os
import signal

import keras
import numpy as np
from helpers import tiny_basic_model

from keras_insightface.nn import losses
from keras_insightface.training import train


class KillMidEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.kill_epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.kill_epoch and batch >= 1:
            os.kill(os.getpid(), signal.SIGKILL)


def slots_sum(optimizer):
    """Sum of |value| over the optimizer's slot variables (not its step count and learning rate)."""
    slots = [var for var in optimizer.variables if var.path.split("/")[-1] not in ("iteration", "learning_rate")]
    return f"{sum(float(np.abs(var.numpy()).sum()) for var in slots):.6f}"


class ReportOptimizer(keras.callbacks.Callback):
    """Print the optimizer's step count and slots at each epoch end (the checkpoint holds these values)."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.trainer.optimizer
        print(f"epoch {epoch + 1} optimizer slots sum {slots_sum(optimizer)}", flush=True)
        print(f"epoch {epoch + 1} optimizer iterations {int(optimizer.iterations.numpy())}", flush=True)


class ReportCenters(keras.callbacks.Callback):
    """Print the center-loss centers the run starts from (restored from the centers file after a restart)."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_train_begin(self, logs=None):
        centers = self.trainer.center_loss.centers.numpy()
        print(f"initial centers sum {np.abs(centers).sum():.4f}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("save_path")
    parser.add_argument("--kill_at_epoch", type=int, default=-1)
    args = parser.parse_args()
    tt = train.Train(
        args.data,
        args.save_path,
        basic_model=tiny_basic_model(),
        batch_size=16,
        lr_base=0.01,
        lr_decay=0.5,
        lr_decay_steps=[2],
        verbose=1,
    )
    tt.custom_callbacks += [ReportCenters(tt), ReportOptimizer(tt)]
    if args.kill_at_epoch >= 0:
        tt.custom_callbacks.append(KillMidEpoch(args.kill_at_epoch))
    if tt.optimizer is not None:
        iterations, slots = int(tt.optimizer.iterations.numpy()), slots_sum(tt.optimizer)
        print(f"restored optimizer iterations {iterations} slots sum {slots}", flush=True)
    sch = [{"loss": losses.ArcfaceLoss(scale=16), "centerloss": 0.01, "optimizer": "adam", "epoch": 4}]
    tt.train(sch, 0)


if __name__ == "__main__":
    main()
