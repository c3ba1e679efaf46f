"""Writes the PyTorch models of ``bench_exports.py`` as ONNX files, the way a user exports them today.

Run by ``bench_exports.py`` in a venv of its own (torch 2.13 CPU, onnxscript, onnx: the dynamo
exporter needs onnxscript, which onnxzip does not): ``python make_models.py OUT_DIR``. Writes
``OUT_DIR/NAME.onnx`` (with ``NAME.onnx.data``, the exporter's external weights) and
``OUT_DIR/NAME.npz`` (64 inputs, or 32, keyed by input name) and prints one line per file. The
weights are random (seeded), with BatchNorm statistics set away from the identity: the files test
what the exporter writes, not what a trained model computes.
"""
from __future__ import annotations

import collections
import sys

import numpy as np
import onnx
import torch
import torch.nn as nn

torch.manual_seed(0)

class CNN(nn.Module):
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        s.b1 = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32))
        s.down = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())
        s.fc = nn.Linear(64, 10)
    def forward(s, x):
        x = s.stem(x); x = torch.relu(x + s.b1(x)); x = s.down(x)
        return s.fc(x.mean((2, 3)))

class Mobile(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish())
        s.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.Hardswish())
        s.se1 = nn.Conv2d(16, 8, 1); s.se2 = nn.Conv2d(8, 16, 1)
        s.pw = nn.Sequential(nn.Conv2d(16, 48, 1), nn.BatchNorm2d(48), nn.ReLU6())
        s.up = nn.ConvTranspose2d(48, 8, 2, 2)
    def forward(s, x):
        x = s.a(x); y = s.dw(x)
        w = nn.functional.hardsigmoid(s.se2(torch.relu(s.se1(y.mean((2, 3), keepdim=True)))))
        y = s.pw(y * w)
        return torch.sigmoid(s.up(y))

class BiLSTM(nn.Module):
    def __init__(s):
        super().__init__()
        s.lstm = nn.LSTM(40, 96, num_layers=2, bidirectional=True, batch_first=True)
        s.fc = nn.Linear(192, 30)
    def forward(s, x):
        y, _ = s.lstm(x)
        return s.fc(y).log_softmax(-1)

class Enc(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(1000, 64)
        s.pos = nn.Parameter(torch.randn(1, 32, 64) * 0.02)
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
        s.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        s.head = nn.Linear(64, 5)
    def forward(s, ids, mask):
        x = s.emb(ids) + s.pos[:, : ids.shape[1]]
        x = s.enc(x, src_key_padding_mask=mask)
        return s.head(x[:, 0])

class GRUDenoise(nn.Module):
    def __init__(s):
        super().__init__()
        s.inp = nn.Linear(161, 128); s.gru = nn.GRU(128, 128, batch_first=True); s.out = nn.Linear(128, 161)
    def forward(s, x, h):
        y, h2 = s.gru(torch.relu(s.inp(x)), h)
        return torch.sigmoid(s.out(y)), h2

class Wav(nn.Module):
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv1d(1, 32, 10, 5); s.ln = nn.LayerNorm(32); s.c2 = nn.Conv1d(32, 64, 3, 2)
        s.fc = nn.Linear(64, 12)
    def forward(s, x):
        x = s.c1(x).transpose(1, 2); x = nn.functional.gelu(s.ln(x)).transpose(1, 2)
        x = nn.functional.gelu(s.c2(x))
        return s.fc(x.mean(-1))


class Tied(nn.Module):  # tied embeddings + argmax int64 output
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(500, 64); s.mix = nn.Linear(64, 64)
    def forward(s, ids):
        h = torch.tanh(s.mix(s.emb(ids)))
        logits = h @ s.emb.weight.t()
        return logits, logits.argmax(-1)

class Cond(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(32, 32); s.b = nn.Linear(32, 32); s.out = nn.Linear(32, 4)
    def forward(s, x, flag):
        y = torch.cond(flag.sum() > 0, lambda x: torch.relu(s.a(x)), lambda x: torch.sigmoid(s.b(x)), (x,))
        return s.out(y)

class MHA(nn.Module):
    def __init__(s):
        super().__init__()
        s.att = nn.MultiheadAttention(64, 4, batch_first=True); s.fc = nn.Linear(64, 3)
    def forward(s, x):
        y, _ = s.att(x, x, x, need_weights=False)
        return s.fc(y.mean(1))

class DynHW(nn.Module):
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(3, 24, 3, 1, 1); s.bn = nn.BatchNorm2d(24); s.c2 = nn.Conv2d(24, 24, 3, 1, 1); s.c3 = nn.Conv2d(24, 1, 1)
        s.up = nn.Upsample(scale_factor=2, mode="bilinear")
    def forward(s, x):
        y = torch.relu(s.bn(s.c1(x))); y = torch.relu(s.c2(nn.functional.max_pool2d(y, 2)))
        return torch.sigmoid(s.c3(s.up(y)))



def export(out: str, name: str, module: nn.Module, args: tuple, names: list[str], dynamic: dict,
           data: dict[str, np.ndarray], dynamo: bool = True, **options) -> None:
    module.eval()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 2)
            layer.weight.data.uniform_(0.2, 1.5)
    path = f"{out}/{name}.onnx"
    try:
        torch.onnx.export(module, args, path, input_names=names, dynamic_axes=dynamic, dynamo=dynamo, verbose=False,
                          **options)
    except Exception as exc:  # noqa: BLE001 - reported, the other files still get written
        print(f"{name}: export failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return
    model = onnx.load(path, load_external_data=False)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    print(f"{name}: IR {model.ir_version}, opset {model.opset_import[0].version}, {len(model.graph.node)} nodes "
          f"({', '.join(f'{op} {count}' for op, count in ops.most_common(6))})", flush=True)
    np.savez(f"{out}/{name}.npz", **data)


def main(out: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(0, 1000, (64, 32))
    mask = np.arange(32)[None] >= rng.integers(8, 32, (64, 1))
    batch = {"x": {0: "batch"}}
    export(out, "cnn", CNN(), (torch.randn(2, 3, 32, 32),), ["x"], batch, {"x": image})
    export(out, "cnn_op22", CNN(), (torch.randn(2, 3, 32, 32),), ["x"], batch, {"x": image}, opset_version=22)
    export(out, "cnn_op23", CNN(), (torch.randn(2, 3, 32, 32),), ["x"], batch, {"x": image}, opset_version=23)
    export(out, "cnn_fp16", CNN().half(), (torch.randn(2, 3, 32, 32).half(),), ["x"], batch, {"x": image.astype(np.float16)})
    export(out, "mobile", Mobile(), (torch.randn(2, 3, 32, 32),), ["x"], batch, {"x": image})
    export(out, "wav", Wav(), (torch.randn(2, 1, 1600),), ["x"], batch,
           {"x": rng.standard_normal((64, 1, 1600)).astype(np.float32)})
    export(out, "bilstm", BiLSTM(), (torch.randn(2, 50, 40),), ["x"], {"x": {0: "batch", 1: "time"}},
           {"x": rng.standard_normal((64, 50, 40)).astype(np.float32)})
    enc_args = (torch.randint(0, 1000, (2, 32)), torch.zeros(2, 32, dtype=torch.bool))
    enc_dynamic = {"ids": {0: "batch"}, "mask": {0: "batch"}}
    export(out, "enc", Enc(), enc_args, ["ids", "mask"], enc_dynamic, {"ids": ids, "mask": mask})
    export(out, "enc_op23", Enc(), enc_args, ["ids", "mask"], enc_dynamic, {"ids": ids, "mask": mask}, opset_version=23)
    export(out, "gru", GRUDenoise(), (torch.randn(2, 20, 161), torch.zeros(1, 2, 128)), ["x", "h"],
           {"x": {0: "batch", 1: "frames"}, "h": {1: "batch"}},
           {"x": rng.standard_normal((64, 20, 161)).astype(np.float32),
            "h": (rng.standard_normal((1, 64, 128)) * 0.3).astype(np.float32)})
    export(out, "tied", Tied(), (torch.randint(0, 500, (2, 12)),), ["ids"], {"ids": {0: "b", 1: "t"}},
           {"ids": rng.integers(0, 500, (64, 12))})
    export(out, "cond", Cond(), (torch.randn(2, 32), torch.ones(1)), ["x", "flag"], {"x": {0: "b"}},
           {"x": rng.standard_normal((64, 32)).astype(np.float32), "flag": np.ones(1, np.float32)})
    sequence = {"x": rng.standard_normal((64, 10, 64)).astype(np.float32)}
    export(out, "mha", MHA(), (torch.randn(2, 10, 64),), ["x"], {"x": {0: "b"}}, sequence)
    export(out, "mha_legacy", MHA(), (torch.randn(2, 10, 64),), ["x"], {"x": {0: "b"}}, sequence, dynamo=False,
           opset_version=17)
    frames = {"x": rng.standard_normal((32, 3, 32, 48)).astype(np.float32)}
    spatial = {"x": {0: "b", 2: "h", 3: "w"}}
    export(out, "dynhw", DynHW(), (torch.randn(2, 3, 32, 48),), ["x"], spatial, frames)
    export(out, "dynhw_legacy", DynHW(), (torch.randn(2, 3, 32, 48),), ["x"], spatial, frames, dynamo=False,
           opset_version=13)


if __name__ == "__main__":
    main(sys.argv[1])
