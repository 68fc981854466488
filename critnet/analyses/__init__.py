"""The analyses of the public API, one module each (Lightning-free): every one takes ``(model, data, *, settings…,
distributed=None)`` and returns a result object from :mod:`critnet.results`."""
