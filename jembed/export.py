"""Export a jembed text model as a Hugging Face / sentence-transformers directory (no torch needed).

    python -m jembed.export --model runs/ct --output runs/ct-hf

The directory holds a torch-layout `model.safetensors`, `config.json` (the model_type of the encoder's
family: bert, roberta, xlm-roberta, mpnet or modernbert), the
tokenizer files and sentence-transformers' modules (pooling, normalisation), so
`transformers.AutoModel.from_pretrained` and `sentence_transformers.SentenceTransformer` load it and
compute the same outputs. LoRA runs are exported with their adapters merged into the weights; an MLM
run's head goes along (transformers' `cls.predictions`). An image classifier (ResNet or ViT) becomes
a `ResNetForImageClassification` / `ViTForImageClassification` directory with `id2label` and
`preprocessor_config.json` (jembed/interop/hf_image.py).
"""
from __future__ import annotations

import argparse
import sys

from flax import nnx

from jembed.errors import UserError, run_cli


def export(model_dir: str, output: str, *, step: int | None = None) -> str:
  import tokenizers
  from jembed import fs, hf, modelspec
  from jembed.tasks import task_class
  if modelspec.read(model_dir) is None:
    raise UserError(f"'{model_dir}' is not a jembed workdir (no {modelspec.MODEL_FILE}); give the "
                    "--workdir of a jembed run")
  spec, model, step = modelspec.load_model(model_dir, step)
  if spec.get("modality") == "image" or "image_shape" in spec:
    from jembed.interop import hf_image
    hf_image.save_dir(output, spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                      nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    return f"exported {model_dir} (step {step}) to {output}"
  if "encoder" not in spec:
    raise UserError(f"'{model_dir}' holds an image model ({spec['task']}); Hugging Face export is for "
                    "text encoders")
  backbone = getattr(model, task_class(spec["task"]).backbone_of(spec))
  mlm_head = nnx.to_pure_dict(nnx.state(model.mlm_head, nnx.Param)) if spec["task"] == "mlm" else None
  hf.save_dir(output, encoder_config=spec["encoder"],
              params=nnx.to_pure_dict(nnx.state(backbone, nnx.Param)),
              tokenizer=tokenizers.Tokenizer.from_str(fs.read_text(fs.join(model_dir, spec["tokenizer"]))),
              pooling=spec.get("pooling", "mean"), normalize=bool(spec.get("normalize", False)),
              max_seq_length=int(spec.get("max_seq_length") or spec["seq_len"]), mlm_head=mlm_head,
              special_ids=spec.get("special_ids"))
  return f"exported {model_dir} (step {step}) to {output}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jembed.export", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="a jembed workdir")
  p.add_argument("--output", required=True, help="the Hugging Face directory to write")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  return run_cli(p, lambda args: export(args.model, args.output, step=args.step))(argv)


if __name__ == "__main__":
  sys.exit(main())
