"""Image input throughput and memory: jembed's streamed pipeline (jembed/data/image_stream.py) vs
torchvision `ImageFolder` + `DataLoader`, with the same transforms and worker count, side by side.

  PYTHONPATH=. python benchmarks/image_input.py [--images 1000] [--workers 4] [--batch 64]
      [--batches 30] [--size 224] [--repeats 2] [--rss-images 1000,20000] [--dir DIR]

Throughput: a generated folder of --images JPEGs of mixed sizes (shorter side 160..500 px, 10
classes). Train view: random-resized crop to --size (scale 0.08..1, torchvision's sampling) + flip;
eval view: resize the shorter side to size / 0.875, center crop. Both sides output uint8 images
(torchvision: PILToTensor; normalisation runs on device in jembed, so neither side pays for it
here). images/s is measured over --batches batches after the first (worker start-up excluded);
the two sides take turns --repeats times and every run is printed.

Memory: peak RSS of a fresh process that opens a folder of N images (--rss-images; the extra
names are hard links to the generated files, so generating 20,000 costs nothing) and reads
--batches training batches; for jembed the file list is the only thing that grows with N.
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10


def generate(root: str, n: int, seed: int = 0) -> str:
  """root/c<k>/<i>.jpg: n JPEGs, shorter side 160..500 px, aspect 0.75..1.33 (kept if present)."""
  if os.path.isdir(root) and sum(len(f) for _, _, f in os.walk(root)) >= n:
    return root
  rng = np.random.default_rng(seed)
  for i in range(n):
    short = int(rng.integers(160, 501))
    long = int(short * rng.uniform(1.0, 1.33))
    h, w = (short, long) if rng.random() < 0.5 else (long, short)
    # Smooth gradients plus noise: JPEG sizes near real photos' (noise alone compresses badly).
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (i % 7 + 1)) % 256, (y * (i % 5 + 1)) % 256, (x + y) % 256], -1)
    img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    folder = os.path.join(root, f"c{i % CLASSES}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
  return root


def linked(src: str, dst: str, n: int) -> str:
  """dst with n image names: hard links that cycle over src's files."""
  if os.path.isdir(dst):
    return dst
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
  for i in range(n):
    folder = os.path.join(dst, f"c{i % CLASSES}")
    os.makedirs(folder, exist_ok=True)
    os.link(files[i % len(files)], os.path.join(folder, f"{i:06d}.jpg"))
  return dst


# ----------------------------------------------------------------------------- jembed


def jembed_stream(folder: str, workers: int, size: int):
  import ml_collections
  from jembed.data import image_stream, image_transforms
  cfg = ml_collections.ConfigDict(dict(train=folder, eval_fraction=0.0, image_size=size, channels=3,
                                       workers=workers, crop_scale=(0.08, 1.0), flip=True,
                                       on_bad_record="error"))
  train = image_stream.open_splits(cfg)[0]
  # The same recipe torchvision's eval side uses: shorter side to 256, center crop 224.
  train.pp = image_transforms.torchvision_imagenet(size)
  return train


def time_batches(it, batches: int) -> float:
  next(it)  # start-up (worker processes, first reads) excluded
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return time.perf_counter() - t


def jembed_rate(folder: str, workers: int, batch: int, batches: int, size: int) -> dict:
  stream = jembed_stream(folder, workers, size)
  it = stream.train_iterator(batch, seed=0)
  train = time_batches(it, batches)
  if hasattr(it, "close"):
    it.close()
  n_eval = eval_count(len(stream), batch, batches)
  it = iter(stream.eval_batches(batch, n_eval + 1))
  evals = time_batches(it, n_eval)
  for _ in it:  # let the generator close its workers
    pass
  return {"train": batch * batches / train, "eval": batch * n_eval / evals}


def eval_count(images: int, batch: int, batches: int) -> int:
  """Timed eval batches: one pass over the folder at most (the first batch is not timed)."""
  n = min(batches, images // batch - 1)
  if n < 1:
    raise SystemExit(f"--images {images} holds fewer than 2 batches of {batch}; raise --images")
  return n


# ----------------------------------------------------------------------------- torchvision


def _torchvision():
  # PyPI's torchvision is built against CUDA torch; its compiled ops cannot load with the CPU torch
  # installed here. Its datasets and PIL transforms are pure Python and work once this module, which
  # registers those ops, is stubbed out.
  sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
  import torch
  import torchvision
  from torchvision import transforms as T
  return torch, torchvision, T


def torch_loader(folder: str, workers: int, batch: int, size: int, train: bool):
  torch, torchvision, T = _torchvision()
  if train:
    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
  else:
    tf = T.Compose([T.Resize(int(size / 0.875 + 0.5)), T.CenterCrop(size), T.PILToTensor()])
  ds = torchvision.datasets.ImageFolder(folder, transform=tf)
  # Workers kept across epochs, as jembed's stream keeps its own.
  return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=train, num_workers=workers,
                                     drop_last=True, persistent_workers=workers > 0)


def endless(loader):
  while True:
    yield from loader


def torch_rate(folder: str, workers: int, batch: int, batches: int, size: int) -> dict:
  out = {}
  for name, train in (("train", True), ("eval", False)):
    loader = torch_loader(folder, workers, batch, size, train)
    n = batches if train else eval_count(len(loader.dataset), batch, batches)
    out[name] = batch * n / time_batches(endless(loader) if train else iter(loader), n)
    del loader
  return out


# ----------------------------------------------------------------------------- memory


def _hwm_mib(pid: int | str = "self") -> float:
  """Peak resident memory (VmHWM) of a process. Not getrusage's ru_maxrss, which a process started
  by fork + exec inherits from its parent."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _children(pid: int) -> list[int]:
  out = []
  for d in os.listdir("/proc"):
    if d.isdigit():
      try:
        with open(f"/proc/{d}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
      except (OSError, IndexError, ValueError):
        pass
  return out


def rss_child(kind: str, folder: str, workers: int, batch: int, batches: int, size: int) -> None:
  """Runs in a fresh process: reads `batches` train batches, prints peak RSS (MiB) of this process
  and of its largest worker process (read while they run)."""
  if kind == "jembed":
    it = jembed_stream(folder, workers, size).train_iterator(batch, seed=0)
  else:
    it = endless(torch_loader(folder, workers, batch, size, True))
  for _ in range(batches):
    next(it)
  main = _hwm_mib()
  kids = [_hwm_mib(c) for c in _children(os.getpid())]
  if hasattr(it, "close"):
    it.close()
  del it
  print(json.dumps({"main_mib": round(main, 1), "worker_mib": round(max(kids, default=0.0), 1)}))


def peak_rss(kind: str, folder: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", kind, "--dir", folder,
         "--workers", str(args.workers), "--batch", str(args.batch),
         "--batches", str(min(args.batches, 10)), "--size", str(args.size)]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if out.returncode:
    raise RuntimeError(f"{kind} RSS run failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=1000)
  p.add_argument("--workers", type=int, default=4)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--rss-images", default="1000,20000")
  p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
  p.add_argument("--dir", default="")
  p.add_argument("--rss-child", default="")
  p.add_argument("--skip-rate", action="store_true", help="only the memory part")
  args = p.parse_args()
  if args.rss_child:
    rss_child(args.rss_child, args.dir, args.workers, args.batch, args.batches, args.size)
    return
  root = args.dir or os.path.join(tempfile.gettempdir(), "jembed_image_input")
  t = time.perf_counter()
  folder = generate(os.path.join(root, f"jpegs_{args.images}"), args.images)
  print(f"folder: {folder} ({args.images} JPEGs, {time.perf_counter() - t:.0f} s to generate or find)",
        flush=True)
  result = {"images": args.images, "workers": args.workers, "batch": args.batch,
            "batches": args.batches, "size": args.size, "cpus": os.cpu_count()}
  if not args.skip_rate:
    # The two take turns (a shared machine's load drifts); every run is printed, the best kept.
    runs = {"jembed": [], "torchvision": []}
    print(f"\nimages/s, {args.workers} workers, batch {args.batch}, {args.size} px "
          f"(higher is better)\n{'':20s}{'train view':>12s}{'eval view':>12s}")
    for r in range(args.repeats):
      for k, rate in (("jembed", jembed_rate), ("torchvision", torch_rate)):
        runs[k].append(rate(folder, args.workers, args.batch, args.batches, args.size))
        print(f"{k + f' (run {r + 1})':20s}{runs[k][-1]['train']:12.1f}{runs[k][-1]['eval']:12.1f}",
              flush=True)
    result["images_per_sec_runs"] = runs
    result["images_per_sec"] = {k: {v: max(x[v] for x in rs) for v in ("train", "eval")}
                                for k, rs in runs.items()}
  result["peak_rss_mib"] = {}
  print(f"\npeak RSS (MiB) after {min(args.batches, 10)} train batches: main process / largest worker")
  for n in (int(v) for v in args.rss_images.split(",") if v):
    names = linked(folder, os.path.join(root, f"links_{n}"), n)
    row = {kind: peak_rss(kind, names, args) for kind in ("jembed", "torchvision")}
    result["peak_rss_mib"][n] = row
    print(f"{n:>7d} images  " + "  ".join(f"{k} {v['main_mib']:.0f} / {v['worker_mib']:.0f}"
                                        for k, v in row.items()), flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
