"""prune.structured on a real, trained CNN: a small conv net (conv-BatchNorm-ReLU stacks, a residual
block, a Linear head) trained here on scikit-learn's bundled digits (1,797 8x8 images, offline); a
quarter of its conv channels removed must keep the held-out accuracy within 2 points, and the report
shows the FLOPs before and after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

import bevel
from tests.passes.test_prune_structured import ResidualConvNet


def digits_split():
    """scikit-learn's bundled 8x8 digits (offline), a fixed split: 1400 to train, the rest held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return (images[order[:1400]], labels[order[:1400]]), (images[order[1400:]], labels[order[1400:]])


def train_digits_net(images: torch.Tensor, labels: torch.Tensor, epochs: int = 10) -> ResidualConvNet:
    # fixed seeds so the test is deterministic; the accuracy kept after pruning varies by about a point
    # from seed to seed (within the 2 points on every seed tried)
    torch.manual_seed(0)
    model = ResidualConvNet(width=48, classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(order), 64):
            batch = order[i:i + 64]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@contextmanager
def one_thread():
    """Run torch on one thread: this net's tensors are so small that on a busy machine the threads cost
    more in waiting for each other than they save (training took ten times longer on two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_pruned_digits_cnn_keeps_its_accuracy_and_reports_flops():
    (train_x, train_y), (test_x, test_y) = digits_split()

    def accuracy(m) -> float:
        with torch.no_grad():
            return float((m(test_x).argmax(dim=-1) == test_y).float().mean())

    with one_thread():
        model = train_digits_net(train_x, train_y)
        calibration = [(train_x[i:i + 100],) for i in range(0, 400, 100)]
        compiled = bevel.compile(model, 'prune.structured(target="conv", ratio=0.25)',
                                 example_inputs=calibration[0], calibration=calibration)
        before, after = accuracy(model), accuracy(compiled)
    entry = compiled.report["prune.structured"]
    print(f"digits CNN: held-out accuracy {before:.4f} -> {after:.4f}; "
          f"FLOPs {entry.before.flops} -> {entry.after.flops}; params {entry.before.params} -> {entry.after.params}")
    assert entry.status == "applied"
    assert entry.after.flops < entry.before.flops
    assert "GFLOPs" in str(compiled.report)
    assert after >= before - 0.02  # the target
