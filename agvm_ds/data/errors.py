"""The one exception type for bad data.

Every problem with a dataset on disk (missing file, malformed JSON, unknown category id,
an impossible box, a label map with out-of-range values) raises :class:`DatasetError`
with a message that starts with the offending file, so a user can fix it without reading
a traceback. It subclasses :class:`ValueError` so generic "bad input" handlers catch it.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad or inconsistent data on disk; the message names the file and the problem."""
