"""The prefix cache: the keys and values of prefilled prompts, kept in pages in memory and on disk.

* `prefix` - `PrefixCache` and `PrefixRun`: restore a prompt's longest cached prefix, save its pages;
* `config` - `CacheConfig`; `chain` - the hash chain naming pages; `memory` - stores kept in memory;
* `directory`, `disk`, `page_file` - the shared folder, pages saved and loaded, one page's file;
* `fingerprint` - what must match before pages are reused; `listing` - ``reattention cache ls|rm``.
"""

from reattention_core.cache.config import CacheConfig, default_memory_bytes, default_page_size
from reattention_core.cache.prefix import CacheInfo, PageSource, PrefixCache, PrefixRun

__all__ = [
    "CacheConfig",
    "CacheInfo",
    "PageSource",
    "PrefixCache",
    "PrefixRun",
    "default_memory_bytes",
    "default_page_size",
]
