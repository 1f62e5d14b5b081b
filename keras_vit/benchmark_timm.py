"""The timm side of apps/benchmark.py, run as a separate process by the reference interpreter.

    /path/to/python keras_vit/benchmark_timm.py --model=vit_small_patch16_224 \
        --img_size=224 --batch_size=8 --threads=2

It needs only torch and timm (never keras_vit, TensorFlow or Keras: with oneDNN on, Keras
under XLA and timm in one process crashed, DESIGN.md). It builds the timm model of the same
name (random init, eval mode), prints one JSON line {"ready": ...}, then answers each JSON
command line read from stdin ({"mode": "infer"|"train", "warmup": W, "iters": N,
"seconds": S}) with one JSON line of images/s, batch-1 latency (ms) and peak RSS (MiB), so
the caller can alternate Keras and timm rounds without rebuilding the model.
"""

import argparse
import importlib.util
import json
import os
import sys

# Run as a file from inside the package: keep keras_vit's subpackages (data, models, ...)
# from shadowing top-level modules that torch or timm import.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def _load_measure():
    """keras_vit/measure.py, imported from its file: importing the keras_vit package would
    load TensorFlow."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "measure.py")
    spec = importlib.util.spec_from_file_location("keras_vit_measure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


measure = _load_measure()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--img_size", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--num_classes", type=int, default=None)
    args = parser.parse_args(argv)

    import timm
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model not in timm.list_models():
        print(json.dumps({"error": f"timm {timm.__version__} has no model {args.model!r}"}),
              flush=True)
        return 3
    kwargs = {"pretrained": False, "img_size": args.img_size}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        model = timm.create_model(args.model, **kwargs).eval()
    except TypeError:  # a fully convolutional design without img_size (PVT v2): any size runs
        del kwargs["img_size"]
        model = timm.create_model(args.model, **kwargs).eval()
    x_batch = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    x_one = torch.randn(1, 3, args.img_size, args.img_size)
    print(json.dumps({"ready": True, "torch": torch.__version__, "timm": timm.__version__,
                      "threads": torch.get_num_threads(),
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)

    optimizer = None
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("mode") == "quit":
            break
        warmup, iters, seconds = cmd.get("warmup", 2), cmd.get("iters", 10), cmd.get("seconds")
        measure.reset_peak_rss()
        result = {"mode": cmd["mode"]}
        if cmd["mode"] == "infer":
            model.eval()
            with torch.inference_mode():
                times = measure.timed(lambda: model(x_batch), warmup, iters, seconds)
                result["images_per_s"] = args.batch_size / measure.median(times)
                times = measure.timed(lambda: model(x_one), warmup, iters, seconds)
                result["latency_ms"] = 1000.0 * measure.median(times)
        elif cmd["mode"] == "train":
            # The Keras side's train_on_batch: AdamW step on cross-entropy, batch B.
            model.train()
            if optimizer is None:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
            num_classes = model.num_classes or model.num_features
            labels = torch.randint(0, num_classes, (args.batch_size,))

            def step():
                optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x_batch), labels)
                loss.backward()
                optimizer.step()

            times = measure.timed(step, warmup, iters, seconds)
            result["images_per_s"] = args.batch_size / measure.median(times)
            model.eval()
        else:
            result["error"] = f"unknown mode {cmd['mode']!r}"
        result["peak_rss_mib"], result["memory_source"] = measure.peak_rss_mib()
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
