"""The main job: SwinV2 on identical random weights in swinv2_fast, transformers and timm.

Prints (1) the parity of swinv2_fast against transformers and timm and (2) CPU images per second of each,
eager, measured in one run with the implementations interleaved, and the ratio to transformers.

    python benchmarks/main.py                 # SwinV2-T, 256x256, window 8, batch 8, fp32, eval
    python benchmarks/main.py --batch 2 --repeats 3
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

VARIANTS = {
    "tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    "small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
    "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_models(variant: str, image_size: int, window: int, seed: int):
    """timm model with perturbed random weights, converted to swinv2_fast; transformers loads the same state dict."""
    import timm.models.swin_transformer_v2 as timm_swin
    import transformers

    import swinv2_fast

    torch.manual_seed(seed)
    spec = VARIANTS[variant]
    timm_model = timm_swin.SwinTransformerV2(
        img_size=image_size, window_size=window, num_classes=0, drop_path_rate=0.0, **spec
    )
    with torch.no_grad():
        for p in timm_model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # off the initialisation: non-zero biases, unequal scales
    ours = swinv2_fast.from_timm(timm_model)
    hf_config = transformers.Swinv2Config(image_size=image_size, window_size=window, drop_path_rate=0.0, **spec)
    hf = transformers.Swinv2Model(hf_config)
    hf.load_state_dict(ours.state_dict())
    ours_hf = swinv2_fast.Swinv2Model(swinv2_fast.Swinv2Config.from_transformers(hf_config))
    ours_hf.load_state_dict(ours.state_dict())
    return {
        "swinv2_fast": ours_hf.eval(),
        "transformers": hf.eval(),
        "timm": timm_model.eval(),
        "swinv2_fast(timm semantics)": ours.eval(),
    }


def features(name, model, x):
    if name == "timm":
        return model.forward_features(x).flatten(1, 2)
    return model(x).last_hidden_state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="tiny")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error(f"--batch and --repeats must be >= 1, got {args.batch} and {args.repeats}")

    import timm
    import transformers

    models = build_models(args.variant, args.image_size, args.window, args.seed)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    print(f"SwinV2-{args.variant[0].upper()} {args.image_size}x{args.image_size} window {args.window}, "
          f"batch {args.batch}, fp32, eval, inference_mode")
    print(f"device: CPU {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, timm {timm.__version__}")

    with torch.inference_mode():
        outs = {name: features(name, m, x) for name, m in models.items()}
    print("\nparity (max |difference| of the final features, fp32):")
    for a, b in [("swinv2_fast", "transformers"), ("swinv2_fast(timm semantics)", "timm"), ("swinv2_fast", "timm")]:
        print(f"  {a:>28} vs {b:<13} {(outs[a] - outs[b]).abs().max().item():.3e}")

    timed = ["swinv2_fast", "transformers", "timm"]
    times = {name: [] for name in timed}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for name in timed:
                features(name, models[name], x)
        for _ in range(args.repeats):  # interleaved so that drifts of a shared machine hit every row alike
            for name in timed:
                start = time.perf_counter()
                features(name, models[name], x)
                times[name].append(time.perf_counter() - start)
    base = args.batch / statistics.median(times["transformers"])
    print(f"\nCPU throughput (median of {args.repeats} rounds, img/s; p20-p80 in brackets):")
    for name in timed:
        ts = sorted(times[name])
        rate = args.batch / statistics.median(ts)
        lo, hi = args.batch / ts[int(0.8 * (len(ts) - 1))], args.batch / ts[int(0.2 * (len(ts) - 1))]
        print(f"  {name:<13} {rate:7.2f}  [{lo:6.2f}-{hi:6.2f}]   x{rate / base:.2f} vs transformers")


if __name__ == "__main__":
    main()
