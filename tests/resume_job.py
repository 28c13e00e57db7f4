"""Helper for test_train.test_resume_after_sigkill: a 4-epoch run with center loss that may SIGKILL itself."""

import argparse
import os
import signal

import keras
import numpy as np
from test_train import tiny_basic_model

import losses
import train


class KillMidEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.kill_epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.kill_epoch and batch >= 1:
            os.kill(os.getpid(), signal.SIGKILL)


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
    original = tt._make_center_loss

    def make_center_loss(alpha=0.5):
        center_loss = original(alpha)
        print(f"initial centers sum {np.abs(center_loss.centers.numpy()).sum():.4f}", flush=True)
        return center_loss

    tt._make_center_loss = make_center_loss
    if args.kill_at_epoch >= 0:
        original_callbacks = tt._callbacks
        tt._callbacks = lambda *cb_args: keras.callbacks.CallbackList(
            [*original_callbacks(*cb_args).callbacks, KillMidEpoch(args.kill_at_epoch)], model=cb_args[0]
        )
    if tt.optimizer is not None:
        print(f"restored optimizer iterations {int(tt.optimizer.iterations.numpy())}", flush=True)
    sch = [{"loss": losses.ArcfaceLoss(scale=16), "centerloss": 0.01, "optimizer": "adam", "epoch": 4}]
    tt.train(sch, 0)


if __name__ == "__main__":
    main()
