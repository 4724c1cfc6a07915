"""An independent statement of the reference RANet, written from the reference code (RANet-pytorch,
``models/RANet.py``, ``args.py``, ``op_counter.py``), for the tests: it builds the network from the
reference command line, knows the reference's state-dict key names, runs the reference forward pass
functionally from such a state dict, and counts per-exit cost with the reference op counter's rules.
It shares no code with ``timm_exits``.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

DEFAULTS = {"nBlocks": "2", "nChannels": "16", "growthRate": "6", "grFactor": "4-2-1", "bnFactor": "4-2-1",
            "block-step": "2", "scale-list": "1-2-3", "compress-factor": "0.25", "step": "4", "stepmode": "even",
            "reduction": "0.5", "data": "cifar10"}


class ReferenceRANet:
    """The reference network as a list of conv-BN-ReLU descriptions, keyed by the reference's names."""

    def __init__(self, command: str):
        a = dict(DEFAULTS, **dict(re.findall(r"--([\w-]+) '?([^'\s]+)'?", command)))
        ints = lambda key: [int(v) for v in a[key].split("-")]  # noqa: E731
        self.data = a["data"]
        self.num_classes = {"cifar10": 10, "cifar100": 100, "ImageNet": 1000}[self.data]
        gr, bnf, scales = ints("grFactor"), ints("bnFactor"), ints("scale-list")
        n_ch, growth0, cf, red = int(a["nChannels"]), int(a["growthRate"]), float(a["compress-factor"]), float(a["reduction"])
        S = len(gr)
        self.convs: Dict[str, Tuple[int, int, int, int, bool]] = {}  # prefix -> (in, out, kernel, stride, bias)
        # stem: FirstLayer.layers.i, finest first
        rg, rs = gr[::-1], scales[::-1]
        if self.data == "ImageNet":
            self.convs["FirstLayer.layers.0.0"] = (3, n_ch * rg[0], 7, 2, True)
        else:
            self.convs["FirstLayer.layers.0.net.0"] = (3, n_ch * rg[0], 3, 1, False)
        level = rs[0]
        for i in range(1, S):
            stride = 1 if rs[i] == level else 2
            level = rs[i]
            self.convs[f"FirstLayer.layers.{i}.net.0"] = (n_ch * rg[i - 1], n_ch * rg[i], 3, stride, False)
        # flows
        n_blocks = [0] + [int(a["block-step"]) * i + int(a["nBlocks"]) for i in range(S)]
        steps = [int(a["step"])]
        self.flows: List[List[dict]] = []
        self.heads: List[Tuple[str, int]] = []
        low_widths: List[List[int]] = []
        for f in range(S):
            flow, c, g, new_low = [], n_ch * gr[f], growth0 * gr[f], []
            for b in range(1, n_blocks[f + 1] + 1):
                pre = f"scale_flows.{f}.{b - 1}."
                trans = any(b == math.floor((i + 1) * n_blocks[f + 1] / scales[f]) for i in range(scales[f] - 1))
                L = steps[b - 1]
                blk = {"fusion": b <= n_blocks[f], "layers": [], "L": L, "trans": None, "last": None, "down": False}
                if blk["fusion"]:
                    blk["down"] = b in n_blocks[:f + 1][-(scales[f] - 1):]
                    up_out = math.floor(g * cf)
                    for j in range(L):
                        stride = 2 if blk["down"] and j == L - 1 else 1
                        blk["layers"].append((self._bottleneck(pre + f"layers.{j}.conv_up.", low_widths[b - 1][j], up_out, 1, bnf[f - 1]),
                                              self._bottleneck(pre + f"layers.{j}.conv_normal.", c + j * g, g - up_out, stride, bnf[f])))
                    out = c + L * g
                    self.convs[pre + "conv_last.net.0"] = (low_widths[b - 1][L], math.floor(out * cf), 1, 1, False)
                    blk["last"] = pre + "conv_last.net.0"
                    out += math.floor(out * cf)
                else:
                    for j in range(L):
                        blk["layers"].append((None, self._bottleneck(pre + f"layers.{j}.conv_normal.", c + j * g, g, 1, bnf[f])))
                    out = c + L * g
                    steps.append(steps[-1] + int(a["step"]) if a["stepmode"] == "lg" else int(a["step"]))
                new_low.append([c + j * g for j in range(L + 1)])
                if trans:
                    self.convs[pre + "trans.net.0"] = (out, math.floor(red * out), 1, 1, False)
                    blk["trans"] = pre + "trans.net.0"
                    out = math.floor(red * out)
                if not blk["fusion"]:
                    k = len(self.heads)
                    w = 128 if self.data.startswith("cifar") else out
                    self.convs[f"classifier.{k}.m.0.net.0"] = (out, w, 3, 2, False)
                    self.convs[f"classifier.{k}.m.1.net.0"] = (w, w, 3, 2, False)
                    self.heads.append((f"classifier.{k}.", w))
                    blk["head"] = k
                flow.append(blk)
                c = out
            low_widths = new_low
            self.flows.append(flow)

    def _bottleneck(self, pre: str, cin: int, cout: int, stride: int, bn_width: int) -> Tuple[str, str]:
        inner = min(cin, bn_width * cout)
        self.convs[pre + "net.0"] = (cin, inner, 1, 1, False)
        self.convs[pre + "net.3"] = (inner, cout, 3, stride, False)
        return pre + "net.0", pre + "net.3"

    @staticmethod
    def _bn_key(conv: str) -> str:
        """The batch norm after a conv: the next index of the same Sequential."""
        head, index = conv.rsplit(".", 1)
        return f"{head}.{int(index) + 1}"

    def random_state_dict(self, seed: int = 0, dtype=torch.float64) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
        return self._state_dict(randn, lambda *s: torch.rand(*s, generator=g, dtype=dtype))

    def meta_state_dict(self) -> Dict[str, torch.Tensor]:
        """Shapes only, on the meta device: enough to count the costs of large networks quickly."""
        empty = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
        return self._state_dict(empty, empty)

    def _state_dict(self, randn, rand) -> Dict[str, torch.Tensor]:
        sd = {}
        for conv, (cin, cout, k, _, bias) in self.convs.items():
            sd[f"{conv}.weight"] = randn(cout, cin, k, k) / math.sqrt(cin * k * k)
            if bias:
                sd[f"{conv}.bias"] = 0.1 * randn(cout)
            bn = self._bn_key(conv)
            sd[f"{bn}.weight"] = 1 + 0.1 * randn(cout)
            sd[f"{bn}.bias"] = 0.1 * randn(cout)
            sd[f"{bn}.running_mean"] = 0.1 * randn(cout)
            sd[f"{bn}.running_var"] = 1 + 0.1 * rand(cout)
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(3)
        for pre, w in self.heads:
            sd[f"{pre}linear.weight"] = randn(self.num_classes, w) / math.sqrt(w)
            sd[f"{pre}linear.bias"] = 0.1 * randn(self.num_classes)
        return sd

    def run(self, sd: Dict[str, torch.Tensor], x: torch.Tensor):
        """Every exit's logits, and per exit the cumulative (ops, params) of the reference op counter
        (conv MACs without bias, one op per ReLU element, k*k per pooling output, linear in*out + out;
        parameters of every layer run) for this input."""
        count = {"ops": 0, "params": 0}

        def cbr(conv: str, x: torch.Tensor) -> torch.Tensor:
            cin, cout, k, s, bias = self.convs[conv]
            bn = self._bn_key(conv)
            y = F.conv2d(x, sd[f"{conv}.weight"], sd.get(f"{conv}.bias"), s, k // 2)
            y = F.batch_norm(y, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"])
            count["ops"] += cin * cout * k * k * y.shape[2] * y.shape[3] + y[0].numel()
            count["params"] += cin * cout * k * k + (cout if bias else 0) + 2 * cout
            return F.relu(y)

        def resize(t: torch.Tensor, hw) -> torch.Tensor:
            return F.interpolate(t, size=hw, mode="bilinear", align_corners=True)

        # stem, finest first; flows read it coarsest first
        stem, y = [], x
        for conv in [c for c in self.convs if c.startswith("FirstLayer.")]:
            y = cbr(conv, y)
            if conv == "FirstLayer.layers.0.0":
                y = F.max_pool2d(y, 3, 2, 1)
                count["ops"] += y[0].numel() * 9
            stem.append(y)
        stem = stem[::-1]
        logits, costs, low = [], [], []
        for f, flow in enumerate(self.flows):
            h, feats = stem[f], []
            for b, blk in enumerate(flow):
                outs = [h]
                for j, (up, normal) in enumerate(blk["layers"]):
                    new = cbr(normal[1], cbr(normal[0], h))
                    if up is None:
                        h = torch.cat([h, new], 1)
                    else:
                        hw = new.shape[2:]
                        h = torch.cat([resize(h, hw), resize(cbr(up[1], cbr(up[0], low[b][j])), hw), new], 1)
                    outs.append(h)
                if blk["last"]:
                    h = torch.cat([h, resize(cbr(blk["last"], low[b][blk["L"]]), h.shape[2:])], 1)
                if blk["trans"]:
                    h = cbr(blk["trans"], h)
                feats.append(outs)
                if "head" in blk:
                    pre, w = self.heads[blk["head"]]
                    z = F.avg_pool2d(cbr(f"{pre}m.1.net.0", cbr(f"{pre}m.0.net.0", h)), 2)
                    count["ops"] += z[0].numel() * 4 + w * self.num_classes + self.num_classes
                    count["params"] += w * self.num_classes + self.num_classes
                    logits.append(F.linear(z.flatten(1), sd[f"{pre}linear.weight"], sd[f"{pre}linear.bias"]))
                    costs.append(dict(count))
            low = feats
        return logits, costs
