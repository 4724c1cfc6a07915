"""An independent statement of the reference MSDNet, written from the reference code (MSDNet-PyTorch),
for the tests: it knows the reference's state-dict key names, runs the reference forward pass
functionally from such a state dict, counts per-exit cost with the reference op counter's rules and
runs its budgeted evaluation on cached softmax outputs. It shares no code with ``timm_exits``.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

# (conv key, bn key, in, out, kernel, stride, padding, conv bias)
CBR = Tuple[str, str, int, int, int, int, int, bool]


def _basic(prefix: str, cin: int, cout: int, k: int, s: int, p: int) -> CBR:
    return (f"{prefix}net.0", f"{prefix}net.1", cin, cout, k, s, p, False)


def _conv_bn(prefix: str, cin: int, cout: int, down: bool, bn_width: int) -> List[CBR]:
    inner = min(cin, bn_width * cout)
    return [(f"{prefix}net.0", f"{prefix}net.1", cin, inner, 1, 1, 0, False),
            (f"{prefix}net.3", f"{prefix}net.4", inner, cout, 3, 2 if down else 1, 1, False)]


class ReferenceMSDNet:
    def __init__(self, nBlocks, base, step, stepmode, nChannels, growthRate, grFactor, bnFactor,
                 data="cifar", num_classes=100, reduction=0.5):
        self.data, self.num_classes, self.gr = data, num_classes, grFactor
        S = len(grFactor)
        steps = [base] + [step if stepmode == "even" else step * i + 1 for i in range(1, nBlocks)]
        L = sum(steps)
        interval = math.ceil(L / S)
        c, l = nChannels, 0
        self.blocks: list = []
        self.heads: list = []
        for b, n in enumerate(steps):
            items, j = [], 0
            if b == 0:
                first = []
                if data == "imagenet":
                    first.append(("blocks.0.0.layers.0.0", "blocks.0.0.layers.0.1", 3, c * grFactor[0], 7, 2, 3, True))
                else:
                    first.append(_basic("blocks.0.0.layers.0.", 3, c * grFactor[0], 3, 1, 1))
                for s in range(1, S):
                    first.append(_basic(f"blocks.0.0.layers.{s}.", c * grFactor[s - 1], c * grFactor[s], 3, 2, 1))
                items.append(("first", first))
                j = 1
            for _ in range(n):
                l += 1
                in_s = S - math.floor(max(0, l - 2) / interval)
                out_s = S - math.floor((l - 1) / interval)
                off = S - out_s
                units = []
                for u, s in enumerate(range(off, S)):
                    pre = f"blocks.{b}.{j}.layers.{u}."
                    if u == 0 and in_s == out_s:
                        units.append(("normal", _conv_bn(pre + "conv_normal.", c * grFactor[s], growthRate * grFactor[s],
                                                         False, bnFactor[s])))
                    else:
                        half = growthRate * grFactor[s] // 2
                        units.append(("downnormal",
                                      _conv_bn(pre + "conv_down.", c * grFactor[s - 1], half, True, bnFactor[s - 1])
                                      + _conv_bn(pre + "conv_normal.", c * grFactor[s], half, False, bnFactor[s])))
                items.append(("layer", in_s - out_s, units))
                j += 1
                c += growthRate
                if in_s > out_s and reduction > 0:
                    new_c = math.floor(reduction * c)
                    items.append(("transition", [_basic(f"blocks.{b}.{j}.m.{u}.", c * grFactor[s], new_c * grFactor[s], 1, 1, 0)
                                                 for u, s in enumerate(range(off, S))]))
                    j += 1
                    c = new_c
            self.blocks.append(items)
            d = c * grFactor[-1]
            w = 128 if data == "cifar" else d
            self.heads.append([_basic(f"classifier.{b}.m.0.", d, w, 3, 2, 1), _basic(f"classifier.{b}.m.1.", w, w, 3, 2, 1), w])

    def _all_cbr(self):
        for items in self.blocks:
            for item in items:
                if item[0] == "layer":
                    for _, cbrs in item[2]:
                        yield from cbrs
                else:
                    yield from item[1]
        for h in self.heads:
            yield from h[:2]

    def random_state_dict(self, seed: int = 0) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return self._state_dict(lambda *shape: torch.randn(*shape, generator=g), lambda *shape: torch.rand(*shape, generator=g))

    def meta_state_dict(self) -> Dict[str, torch.Tensor]:
        """Shapes only, on the meta device: enough to count costs of large networks quickly."""
        empty = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
        return self._state_dict(empty, empty)

    def _state_dict(self, randn, rand) -> Dict[str, torch.Tensor]:
        sd = {}
        for conv, bn, cin, cout, k, _, _, bias in self._all_cbr():
            sd[f"{conv}.weight"] = randn(cout, cin, k, k) / math.sqrt(cin * k * k)
            if bias:
                sd[f"{conv}.bias"] = randn(cout) * 0.1
            sd[f"{bn}.weight"] = 1 + 0.1 * randn(cout)
            sd[f"{bn}.bias"] = 0.1 * randn(cout)
            sd[f"{bn}.running_mean"] = 0.1 * randn(cout)
            sd[f"{bn}.running_var"] = 1 + 0.1 * rand(cout)
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(7)
        for i, h in enumerate(self.heads):
            sd[f"classifier.{i}.linear.weight"] = randn(self.num_classes, h[2]) / math.sqrt(h[2])
            sd[f"classifier.{i}.linear.bias"] = 0.1 * randn(self.num_classes)
        return sd

    def run(self, sd: Dict[str, torch.Tensor], x: torch.Tensor):
        """Every exit's logits, and per exit the cumulative (ops, conv+linear MACs, params) of the
        reference counter for this input."""
        count = {"ops": 0, "macs": 0, "params": 0}

        def cbr(t: CBR, x):
            conv, bn, cin, cout, k, s, p, bias = t
            y = F.conv2d(x, sd[f"{conv}.weight"], sd.get(f"{conv}.bias"), s, p)
            y = F.batch_norm(y, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"])
            macs = cin * cout * k * k * y.shape[2] * y.shape[3]
            count["macs"] += macs
            count["ops"] += macs + cout * y.shape[2] * y.shape[3]  # conv + ReLU elements
            count["params"] += cin * cout * k * k + (cout if bias else 0) + 2 * cout
            return F.relu(y)

        def seq(ts, x):
            for t in ts:
                x = cbr(t, x)
            return x

        logits, costs = [], []
        xs = x
        for b, items in enumerate(self.blocks):
            for item in items:
                if item[0] == "first":
                    y = cbr(item[1][0], xs)
                    if self.data == "imagenet":
                        y = F.max_pool2d(y, 3, 2, 1)
                        count["ops"] += y.numel() * 9
                    xs = [y]
                    for t in item[1][1:]:
                        xs.append(cbr(t, xs[-1]))
                elif item[0] == "transition":
                    xs = [cbr(t, x) for t, x in zip(item[1], xs)]
                else:
                    discard, units = item[1], item[2]
                    out = []
                    for u, (kind, ts) in enumerate(units):
                        same = xs[u + discard]
                        if kind == "normal":
                            out.append(torch.cat([same, seq(ts, same)], 1))
                        else:
                            out.append(torch.cat([same, seq(ts[:2], xs[u + discard - 1]), seq(ts[2:], same)], 1))
                    xs = out
            h = self.heads[b]
            y = F.avg_pool2d(seq(h[:2], xs[-1]), 2)
            count["ops"] += y.numel() * 4
            y = y.flatten(1)
            logits.append(F.linear(y, sd[f"classifier.{b}.linear.weight"], sd[f"classifier.{b}.linear.bias"]))
            count["ops"] += h[2] * self.num_classes + self.num_classes
            count["macs"] += h[2] * self.num_classes
            count["params"] += h[2] * self.num_classes + self.num_classes
            costs.append(dict(count))
        return logits, costs


def reference_for(command: str) -> ReferenceMSDNet:
    """The reference network built by the reference implementation's command line, e.g.
    ``--data cifar100 --nBlocks 7 --stepmode lin_grow --step 1 --base 1 --nChannels 16 ...``."""
    flags = dict(re.findall(r"--(\w+) (\S+)", command))
    factors = lambda key: [int(f) for f in flags[key].split("-")]  # noqa: E731
    data = "imagenet" if flags["data"] == "ImageNet" else "cifar"
    return ReferenceMSDNet(
        int(flags["nBlocks"]), int(flags["base"]), int(flags["step"]), flags["stepmode"], int(flags["nChannels"]),
        int(flags["growthRate"]), factors("grFactor"), factors("bnFactor"), data=data,
        num_classes={"ImageNet": 1000, "cifar100": 100, "cifar10": 10}[flags["data"]])


# ---- the reference's budgeted evaluation (MSDNet-PyTorch adaptive_inference.py), restated with plain
# loops over its cached softmax outputs (exits x samples x classes, float32)

def reference_fractions(q: float, num_exits: int) -> torch.Tensor:
    """The target exit distribution as the reference computes it: exp(log(q) * [1..N]) in float32,
    normalised."""
    weights = torch.exp(torch.log(torch.tensor([q])) * torch.arange(1, num_exits + 1, dtype=torch.float32))
    return weights / weights.sum()


def reference_thresholds(probs: torch.Tensor, fractions: torch.Tensor) -> List[float]:
    """Exit k's threshold is the max-softmax of the floor(n P_k)-th most confident sample not yet
    exited (n P_k a float32 product); 1e8 when that count is 0 or never reached; then every sample
    whose confidence is >= the threshold has exited. The last exit's threshold is -1e8."""
    conf = probs.max(2).values
    num_exits, n = conf.shape
    rows = conf.tolist()  # float32 values, exactly
    thresholds = [1e8] * num_exits
    gone = [False] * n
    for k in range(num_exits - 1):
        quota = math.floor(n * fractions[k])
        seen = 0
        for i in sorted(range(n), key=lambda j: -rows[k][j]):
            if not gone[i]:
                seen += 1
                if seen == quota:
                    thresholds[k] = rows[k][i]
                    break
        gone = [g or c >= thresholds[k] for g, c in zip(gone, rows[k])]
    thresholds[-1] = -1e8
    return thresholds


def reference_dynamic_eval(probs: torch.Tensor, labels: torch.Tensor, thresholds: Sequence[float],
                           flops: Sequence[float]) -> Tuple[float, float]:
    """Each sample leaves at the first exit whose max-softmax is >= its threshold and is right when
    that exit's argmax is the label: (accuracy %, expected cost sum_k (fraction leaving at k) flops_k)."""
    conf, pred = (t.tolist() for t in probs.max(2))
    num_exits, n = len(conf), len(labels)
    right, leaving = 0, [0] * num_exits
    for i, label in enumerate(labels.tolist()):
        k = next(k for k in range(num_exits) if conf[k][i] >= thresholds[k])
        right += pred[k][i] == label
        leaving[k] += 1
    return right * 100.0 / n, sum(m / n * f for m, f in zip(leaving, flops))
