"""Where data comes from: local files of every common type, Hub-layout directories and Hub dataset
ids, read as one stream of rows (`files`, `layout`, `hub`, `source`); the row formats recognised from
column names (`formats`); and tokenized data as flat int32 arrays cached on disk (`store`).

Every reader of anita (SFT, continued pre-training, DPO, KTO, multiple choice, perplexity) takes its
rows from `open_source(...).records()`; docs/data.md lists the sources, formats, flags and the cache.
"""

from anita.sources.files import MAX_ROW_BYTES, Record
from anita.sources.formats import FormatError, parse_columns, rename
from anita.sources.source import DataSource, open_source
from anita.sources.store import TokenStore, cached_store, default_cache_dir, tokenizer_fingerprint

__all__ = ["MAX_ROW_BYTES", "Record", "FormatError", "parse_columns", "rename", "DataSource", "open_source",
           "TokenStore", "cached_store", "default_cache_dir", "tokenizer_fingerprint"]
