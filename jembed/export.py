"""Export a jembed text model as a Hugging Face / sentence-transformers directory (no torch needed).

    python -m jembed.export --model runs/ct --output runs/ct-hf

The directory holds a torch-layout `model.safetensors`, `config.json` (the model_type of the encoder's
family: bert, roberta, xlm-roberta, mpnet or modernbert), the
tokenizer files and sentence-transformers' modules (pooling, normalisation), so
`transformers.AutoModel.from_pretrained` and `sentence_transformers.SentenceTransformer` load it and
compute the same outputs. LoRA runs are exported with their adapters merged into the weights; an MLM
run's head goes along (transformers' `cls.predictions`). A text classifier trained with the Hugging
Face head (model.head=hf, the default from a source whose family head fits) becomes the family's
*ForSequenceClassification (BertForSequenceClassification, ...) with `id2label` / `label2id`; one
with jembed's linear head has no transformers equivalent and is refused, unless --encoder_only asks
for the encoder alone. An image classifier (ResNet or ViT) becomes
a `ResNetForImageClassification` / `ViTForImageClassification` directory with `id2label` and
`preprocessor_config.json` (jembed/interop/hf_image.py).
"""
from __future__ import annotations

import argparse
import sys

from flax import nnx

from jembed.errors import UserError, run_cli


def export(model_dir: str, output: str, *, step: int | None = None, encoder_only: bool = False) -> str:
  """Writes the Hugging Face directory of a jembed workdir; `encoder_only` leaves a text model's
  head out (a classifier's or an MLM's: the encoder alone, as an embedding model)."""
  import tokenizers
  from jembed import fs, hf, modelspec
  from jembed.tasks import task_class
  described = modelspec.read(model_dir)
  if described is None:
    raise UserError(f"'{model_dir}' is not a jembed workdir (no {modelspec.MODEL_FILE}); give the "
                    "--workdir of a jembed run")
  with_classifier = _text_classifier(described) and not encoder_only
  if with_classifier:
    _check_head(model_dir, described)  # before the (slow) restore
  spec, model, step = modelspec.load_model(model_dir, step)
  if spec.get("modality") == "image" or "image_shape" in spec:
    if encoder_only:
      raise UserError("--encoder_only is for text models; an image model is exported whole")
    from jembed.interop import hf_image
    hf_image.save_dir(output, spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                      nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    return f"exported {model_dir} (step {step}) to {output}"
  if "encoder" not in spec:
    raise UserError(f"'{model_dir}' holds an image model ({spec['task']}); Hugging Face export is for "
                    "text encoders")
  backbone = getattr(model, task_class(spec["task"]).backbone_of(spec))
  mlm_head = (nnx.to_pure_dict(nnx.state(model.mlm_head, nnx.Param))
              if spec["task"] == "mlm" and not encoder_only else None)
  classifier = None
  if with_classifier:
    classifier = hf.io.SequenceClassifier(params=nnx.to_pure_dict(nnx.state(model.head, nnx.Param)),
                                          labels=list(spec["class_names"]), pooling=spec["pooling"])
  hf.save_dir(output, encoder_config=spec["encoder"],
              params=nnx.to_pure_dict(nnx.state(backbone, nnx.Param)),
              tokenizer=tokenizers.Tokenizer.from_str(fs.read_text(fs.join(model_dir, spec["tokenizer"]))),
              pooling=spec.get("pooling", "mean"), normalize=bool(spec.get("normalize", False)),
              max_seq_length=int(spec.get("max_seq_length") or spec["seq_len"]), mlm_head=mlm_head,
              special_ids=spec.get("special_ids"), classifier=classifier)
  what = (f" as {hf.config.SEQUENCE_CLASSIFIERS[spec['encoder'].get('family', 'bert')]}"
          if classifier else "")
  return f"exported {model_dir} (step {step}) to {output}{what}"


def _text_classifier(spec: dict) -> bool:
  return spec.get("task") == "classification" and "encoder" in spec and "class_names" in spec


def _check_head(model_dir: str, spec: dict) -> None:
  """A linear head (which no transformers class computes) is refused in one line."""
  from jembed.hf.config import SEQUENCE_CLASSIFIERS
  family = spec["encoder"].get("family", "bert")
  if spec.get("head", "linear") != "hf":
    raise UserError(
        f"{model_dir} is a text classifier with a linear head on {spec['pooling']}-pooled features, which "
        f"{SEQUENCE_CLASSIFIERS[family]} cannot compute (its head is {_HF_HEAD_WORDS[family]}); "
        "fine-tune with --config.model.head=hf to export it as one, or pass --encoder_only to export "
        "the encoder alone")


_HF_HEAD_WORDS = {
    "bert": "BERT's pooler, dense + tanh on [CLS], then a linear layer",
    "roberta": "dense + tanh on <s>, then a linear layer",
    "xlm-roberta": "dense + tanh on <s>, then a linear layer",
    "mpnet": "dense + tanh on <s>, then a linear layer",
    "modernbert": "dense + GELU + LayerNorm on [CLS] or the mean, then a linear layer",
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jembed.export", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="a jembed workdir")
  p.add_argument("--output", required=True, help="the Hugging Face directory to write")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--encoder_only", action="store_true",
                 help="text models: export the encoder without its classifier or MLM head")
  return run_cli(p, lambda args: export(args.model, args.output, step=args.step,
                                        encoder_only=args.encoder_only))(argv)


if __name__ == "__main__":
  sys.exit(main())
