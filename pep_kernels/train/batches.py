"""What the training loops read: an iterable of `(inputs, labels)` batches.

A batch's `inputs` go to the model as `model(*inputs)` when they are a tuple (several arguments,
e.g. a DLRM's dense features, ids and offsets) and as `model(inputs)` otherwise (a tensor, a
TorchRec `KeyedJaggedTensor`, a dict); `labels` are 0/1 floats, one per example. Before each
epoch the loops call the iterable's `set_epoch(epoch)` when it has one (the convention of
torch's `DistributedSampler`), so that an order drawn from the epoch is the same again when an
interrupted run resumes; a resumed epoch skips the batches it had already trained on.
"""

import torch


def epoch_order(num_examples, seed, epoch):
    """The example order of an epoch, a pure function of (seed, epoch) so that runs resume exactly."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def run_model(model, inputs):
    """The model's output for a batch's inputs: `model(*inputs)` for a tuple, else `model(inputs)`."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def to_device(value, device):
    """`value` on `device`: tensors, and tuples, lists and dicts of them, and anything with a
    `.to(device)` (a KeyedJaggedTensor) are moved; other values are returned as they are."""
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value.to(device) if hasattr(value, "to") else value


def start_epoch(batches, epoch):
    """Tells `batches` that `epoch` begins (its `set_epoch`, when it has one)."""
    set_epoch = getattr(batches, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)


class TensorBatches:
    """The `(x[idx], y[idx])` batches of examples held as tensors, in the order
    `epoch_order(len(y), seed, epoch)` split into `batch_size` pieces: a pure function of
    (seed, epoch), so that runs resume exactly. `set_epoch` picks the epoch."""

    def __init__(self, x, y, batch_size, seed=0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(x) != len(y):
            raise ValueError(f"x and y must hold as many examples, got {len(x)} and {len(y)}")
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        for idx in epoch_order(len(self.y), self.seed, self.epoch).split(self.batch_size):
            yield self.x[idx], self.y[idx]

