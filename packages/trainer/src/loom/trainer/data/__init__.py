"""The data pipeline: sources -> samples (token ids + labels) -> packed rows -> rank slices.

- ``sources``: read JSONL / Parquet / ``datasets`` folders, validate records.
- ``samples``: turn records into token ids and shifted labels (plain text or chat).
- ``streaming``: JSONL / Parquet shards read and tokenized as training goes, resumable.
- ``mixture``: a seeded, resumable draw of samples from weighted sources.
- ``packing``: pack samples into rows with per-sample position ids and ``cu_seqlens``.
- ``loader``: global batches of rows for each step, the same for every world size.
- ``collate``: rows to tensors, and the sample boundaries of whole rows for attention.
"""
