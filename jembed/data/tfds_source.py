"""Opening a split of a TFDS dataset that is already prepared under `data.data_dir`.

jembed never downloads at run time: the dataset must have been built elsewhere with
`tfds build NAME --data_dir DIR --file_format=array_record` (array_record is the format TFDS can
read without TensorFlow). Every way this can go wrong is one UserError naming the fix.
"""
from __future__ import annotations

import difflib
import os
from typing import Any

from jembed.errors import UserError


def open_split(data_config: Any, split: str, what: str, example: str):
  """Returns (random-access source, builder) for `split` of `data_config.tfds_name`.

  `what` names the config field that chose the split (for messages); `example` is a dataset
  name to suggest when none is set.
  """
  name = str(getattr(data_config, "tfds_name", "") or "").strip()
  data_dir = str(getattr(data_config, "data_dir", "") or "").strip()
  if not name:
    raise UserError(f"data.source='tfds' needs data.tfds_name, e.g. {example!r}")
  how = (f"prepare it where there is internet with `tfds build {name} --data_dir DIR "
         "--file_format=array_record` and copy DIR here")
  if not data_dir:
    raise UserError(f"data.data_dir is not set for TFDS dataset {name!r}; jembed never downloads: {how}")
  data_dir = os.path.expanduser(data_dir)
  if "://" not in data_dir and not os.path.isdir(data_dir):  # gs:// etc. are checked by tfds
    raise UserError(f"data.data_dir {data_dir!r} does not exist; {how}")
  import tensorflow_datasets as tfds  # heavy; only TFDS runs pay for it
  # Community datasets would be looked up over the network; local builders are enough.
  known = tfds.list_builders(with_community_datasets=False)
  base = name.split("/")[0].split(":")[0]
  if base not in known:
    close = difflib.get_close_matches(base, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown TFDS dataset {name!r}{hint}; set data.tfds_name to a name from "
                    "`tfds.list_builders()`")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot open TFDS dataset {name!r} in {data_dir!r} ({e}); {how}") from None
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise UserError(f"TFDS dataset {name!r} is not prepared in {data_dir!r}; {how}") from None
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"cannot read split {split!r} of TFDS dataset {name!r} ({first_line}); check "
                    f"data.{what} and that it was built with --file_format=array_record") from None
  if len(source) == 0:
    raise UserError(f"split {split!r} of TFDS dataset {name!r} is empty; check data.{what}")
  return source, builder
