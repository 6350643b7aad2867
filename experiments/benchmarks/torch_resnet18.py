"""ResNet-18 (CIFAR stem) training step in PyTorch eager, for comparison with flatjax.

The same network as ``flatjax.models.ResNet18`` (3×3 stem, no max-pool,
stages (2, 2, 2, 2) of basic blocks with 64·2^i filters, projection
shortcuts, BatchNorm momentum 0.1 in PyTorch's convention = 0.9 in Flax's,
11,173,962 parameters for 10 classes) and the same step: cross-entropy on a
random batch, backward, SGD with Nesterov momentum 0.9.

Runs in a separate virtual environment with torch (not a flatjax dependency;
never imported by the test suite)::

    /tmp/torchvenv/bin/python experiments/benchmarks/torch_resnet18.py \
        --batch-size 128 --reps 3 --out experiments/benchmarks/results/torch_resnet18.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        blocks, cin = [], 64
        for i in range(4):
            cout = 64 * 2**i
            for j in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet18()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times, cpu = [], []
    for _ in range(args.reps):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    row = dict(benchmark="torch_resnet18_step", model="resnet18", framework="pytorch eager",
               torch=torch.__version__, threads=args.threads, batch_size=args.batch_size,
               channels_last=args.channels_last, first_call_s=round(first, 3),
               step_median_s=round(statistics.median(times), 4),
               cpu_s_median=round(statistics.median(cpu), 4),
               step_min_s=round(min(times), 4), step_max_s=round(max(times), 4),
               reps=args.reps, num_params=sum(p.numel() for p in model.parameters()),
               load_avg_1m=round(os.getloadavg()[0], 2))
    print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(row, f, indent=2)
    return row


if __name__ == "__main__":
    main()
