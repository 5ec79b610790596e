"""``framecap web``: browse, search, watch and get alerted by the captions of every device.

Modules (one idea each):

- :mod:`cloud.web.model`: the plain objects every part passes around (:class:`CaptionDoc`,
  :class:`SearchFilters`, :class:`SearchRequest`, :class:`SearchPage`, :class:`AlertRule`, ...).
- :mod:`cloud.web.query`: the search box's language (words, "phrases", NOT, OR) parsed once
  into a small tree that each index backend compiles.
- :mod:`cloud.web.index`: the :class:`~cloud.web.index.CaptionIndex` interface, the SQLite FTS5
  backend and :func:`~cloud.web.index.open_index`; :mod:`cloud.web.index_pg`: PostgreSQL.
- :mod:`cloud.web.feed`: fills the index from MQTT (captions, status) and from S3 (reindex).
- :mod:`cloud.web.alerts`: rules checked against each new caption; MQTT and webhook delivery.
- :mod:`cloud.web.attention`: per-word attention maps of a frame (Xu et al. 2015, Fig. 2).
- :mod:`cloud.web.widening`: query words outside the word map widened to their nearest words.
- :mod:`cloud.web.auth`: accounts, roles, sessions and HTTP Basic.
- :mod:`cloud.web.app`: the FastAPI application (pages and ``/api/v1``), :mod:`cloud.web.cli`.

The index is a cache: S3 ``captions/`` stays the source of truth and ``framecap web reindex``
rebuilds it.
"""
