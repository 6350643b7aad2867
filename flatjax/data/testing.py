"""Stand-ins for official tfds datasets in tests and benchmarks (no files, no network).

:func:`mock_official` writes the dataset's tfds metadata (``dataset_info.json``
with ``num_examples`` per split, array_record format) into ``data_dir`` so
that flatjax's "is it prepared?" check passes, and mocks the records with
``tfds.testing.mock_data(policy=USE_FILES)``: ``tfds.data_source`` then
serves deterministic random examples with the real features (for CIFAR-10:
uint8 ``[32, 32, 3]`` images, int64 labels), through the same grain path as
real data. Every split serves the same examples.
"""

from __future__ import annotations

import contextlib
import os

import tensorflow_datasets as tfds

from flatjax.data._catalogue import _spec, default_data_dir


@contextlib.contextmanager
def mock_official(name: str, data_dir: str | os.PathLike, num_examples: int = 64):
    """Serve random examples for official dataset ``name`` from ``data_dir``.

    Args:
      name: an official catalogue name (``"cifar10"``, ``"svhn_cropped"``, ...).
      data_dir: a scratch tfds data dir (metadata is written into it).
      num_examples: examples in every split.

    Yields:
      The absolute data dir; inside the block ``flatjax.data`` reads the mock.

    Example:
      >>> import tempfile, flatjax.data as fd
      >>> with mock_official("cifar10", tempfile.mkdtemp(), num_examples=8) as d:
      ...     next(fd.train_batches("cifar10", batch_size=4, seed=0, data_dir=d))["image"].shape
      (4, 32, 32, 3)
    """
    spec = _spec(name)
    if spec.kind != "official":
        raise ValueError(f"mock_official mocks official tfds datasets only; got {name!r}.")
    data_dir = default_data_dir(data_dir)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    splits = [
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[num_examples],
            num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_path,
                dataset_name=builder.name,
                split=split,
                filetype_suffix="array_record",
            ),
        )
        for split in ("train", "test")
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
    policy = tfds.testing.MockPolicy.USE_FILES
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir, policy=policy):
        yield data_dir
