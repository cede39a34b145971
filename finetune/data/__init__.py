"""Data: from the files and hub data sets a recipe names to the rows each trainer takes.

    files.py    read a source's rows (local JSONL/JSON/Parquet/CSV, folders, hub data sets), streamed
    hashing.py  what identifies a source's content: file hashes (remembered under their stat), hub fingerprints
    sources.py  a data.train/data.eval entry (string or mapping) -> its rows, format, fingerprint
    formats.py  ShareGPT, Alpaca, messages, prompt/completion, preference rows -> the converters' shape
    mixture.py  per-source weight / samples: which rows of each source, seeded
    rows.py     check one row's messages or prompt/completion (RowError says why not); data.system
    templates.py  what the chat template does: assistant turns in the whole rendering, system turns
    masks.py    SFT tokenization: render with the chat template, assistant mask
    convert.py  per stage, a row's JSON object -> what its trainer takes
    prep.py     the whole data set through `datasets` (map, num_proc), once per job, cached
    key.py      the cache key: everything that changes the prepared rows (the template's rendering today too)
    cache.py    the on-disk cache of prepared data sets (key, lock, publish, damage checks)

Nothing is imported here, so `finetune validate` can read a few rows without loading `datasets`.
"""
