"""The page pool behind the paged cache: which page holds what, reference counts, and the prefix cache
(docs/architecture.md#paged-cache).

A full page is known by the hash of every token up to its end (a chain: the hash of the previous page and the
page's own tokens), so two requests with the same first n pages of tokens can share those pages read-only.
A page whose last user finished keeps its contents and its hash, waiting in least-recently-used order until
the pool needs it; a later request with the same prefix takes it back without recomputing it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


def page_hashes(tokens: Sequence[int], page_size: int, known: Sequence[int] = (), upto: int | None = None
                ) -> list[int]:
    """The chained hash of each full page of tokens[:upto]; `known` are the first pages' hashes already
    computed, which are kept and extended (a request's hashes grow with its tokens)."""
    out = list(known)
    upto = len(tokens) if upto is None else upto
    for k in range(len(out), upto // page_size):
        out.append(hash((out[-1] if k else 0, tuple(tokens[k * page_size:(k + 1) * page_size]))))
    return out


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self._free = collections.deque(range(num_pages))
        self._refs = [0] * num_pages
        self._hash_of: dict[int, int] = {}  # page -> hash, for registered (full, computed) pages
        self._page_of: dict[int, int] = {}  # hash -> page
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # registered, unused; LRU

    @property
    def used(self) -> int:
        """Pages some request holds."""
        return self.num_pages - len(self._free) - len(self._idle)

    @property
    def available(self) -> int:
        return len(self._free) + len(self._idle)

    def allocate(self) -> int | None:
        """A page for new rows (reference count 1), evicting the least recently used idle prefix page if
        needed; None when every page is held."""
        if self._free:
            page = self._free.popleft()
        elif self._idle:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._hash_of.pop(page)]
        else:
            return None
        self._refs[page] = 1
        return page

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; an unused page becomes free, or idle if it is registered."""
        for page in pages:
            self._refs[page] -= 1
            assert self._refs[page] >= 0, f"page {page} released more often than taken"
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference to the registered pages of the longest matching prefix of `hashes`."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
            pages.append(page)
        return pages

    def register(self, page: int, h: int) -> None:
        """Mark a held, fully computed page as the page of prefix hash h (the first page with it keeps it)."""
        if h not in self._page_of and page not in self._hash_of:
            self._page_of[h], self._hash_of[page] = page, h
