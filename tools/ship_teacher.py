"""Train (or reuse from the cache) a teacher with a kdpipe recipe and ship it with the package, with its provenance.

    python tools/ship_teacher.py -c configs/teacher-fashion-mnist-wrn16_2.yaml --name fashion_mnist_wrn16_2

Runs ``kdpipe run -c CONFIG --until teacher`` (cached after the first time), evaluates the teacher stage's
output on the test split, and writes ``pipeline/teachers/NAME.safetensors`` plus NAME's entry in
``pipeline/teachers/teachers.json``: the config and command, the teacher stage's cache key, val and test
top-1, parameters, bytes, sha256, the training time and the versions. The weights are exactly the cached
teacher's, so anyone can re-run the same command and compare the cache key and the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="A kdpipe config whose teacher.source is train.")
    parser.add_argument("--name", required=True, help="The shipped name (teacher.path: shipped:NAME).")
    parser.add_argument(
        "--key",
        help="Ship this committed teacher cache entry of the config's cache (e.g. one trained by an earlier kdpipe "
        "whose cache keys differ from this one's) instead of running the recipe.",
    )
    parser.add_argument("--commit", help="The kdpipe commit that trained it (default: this checkout's HEAD).")
    args = parser.parse_args()

    import torch

    from kdpipe.cache import library_versions
    from kdpipe.config import load_config
    from kdpipe.fileio import atomic_write_json, sha256_file
    from kdpipe.ml.data.memory import load_dataset, make_splits
    from kdpipe.ml.models.loading import load_teacher
    from kdpipe.ml.models.weights import load_weights, save_weights
    from kdpipe.ml.train.training import accuracy, predict
    from kdpipe.teachers import FOLDER, MANIFEST, SCHEMA

    cfg = load_config(args.config)
    if cfg.config.teacher.source != "train":
        sys.exit(f"{args.config}: teacher.source must be train to ship a teacher made by kdpipe")
    rel = Path(args.config).resolve().relative_to(ROOT).as_posix()
    command = f"kdpipe run -c {rel} --until teacher"
    if args.key:
        key = args.key
    else:
        run = [sys.executable, "-m", "kdpipe.cli", "run", "-c", args.config, "--until", "teacher"]
        subprocess.run(run, check=True)
        key = json.loads((cfg.output_dir / "report.json").read_text())["stages"]["teacher"]["key"]
    folder = cfg.cache_dir / "teacher" / key
    if not (folder / "metrics.json").is_file():
        sys.exit(f"no committed teacher entry {folder}")
    head = ["git", "-C", str(ROOT), "rev-parse", "HEAD"]
    commit = args.commit or subprocess.run(head, capture_output=True, text=True).stdout.strip()
    metrics = json.loads((folder / "metrics.json").read_text())
    model, spec = load_teacher(folder)
    data = load_dataset(cfg)
    splits = make_splits(cfg, data)
    val_top1 = accuracy(predict(model, splits.val_x, data.mean, data.std, 512, torch.device("cpu")), splits.val_y)
    test_top1 = accuracy(predict(model, data.test_x, data.mean, data.std, 512, torch.device("cpu")), data.test_y)

    target = FOLDER / f"{args.name}.safetensors"
    state = load_weights(folder / spec.get("weights", "teacher.pt"), key="teacher", source=str(folder))
    save_weights(state, target, metadata={"kdpipe_teacher": args.name, "arch": spec["arch"]})
    entries = json.loads(MANIFEST.read_text())["teachers"] if MANIFEST.is_file() else {}
    conf = cfg.config
    entries[args.name] = {
        "file": target.name,
        "sha256": sha256_file(target),
        "bytes": target.stat().st_size,
        "arch": spec["arch"],
        "dataset": conf.data.dataset,
        "classes": spec["classes"],
        "input_shape": spec["input_shape"],
        "normalize": {"mean": data.mean, "std": data.std},
        "split": {"val_fraction": conf.data.val_fraction, "seed": conf.data.seed, "val_images": len(splits.val_idx)},
        "parameters": metrics["parameters"],
        "val_top1": val_top1,
        "test_top1": test_top1,
        "best_epoch": metrics.get("best_epoch"),
        "recipe": {
            "config": rel,
            "command": command,
            "cache_key": key,
            "kdpipe_commit": commit,
            "train": conf.teacher.train.model_dump(mode="json"),
            "augment": conf.data.augment.model_dump(mode="json"),
        },
        "trained": {
            "seconds": round(metrics["seconds"], 1),
            "images_per_second": metrics.get("images_per_second"),
            "host": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "shipped": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"python": platform.python_version(), **library_versions(["kdpipe", "torch", "numpy"])},
        },
    }
    atomic_write_json(MANIFEST, {"schema": SCHEMA, "teachers": dict(sorted(entries.items()))})
    print(f"shipped {target} ({target.stat().st_size:,} bytes): val top-1 {val_top1:.4f}, test top-1 {test_top1:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
